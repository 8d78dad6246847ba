"""The toy world: 64 px images of one coloured shape on a plain background, the base pretrained on it,
an analytic checker of generated images, and the fine-tuning quality benchmark built on both."""
