"""Hypernetworks (the A1111 kind): per context width, a (K, V) pair of small residual MLPs applied to the
attention context before `to_k`/`to_v`, installed on a diffusers UNet through an attention processor.

The module layout mirrors A1111's `HypernetworkModule` so that
state dicts load strictly in A1111, Forge and ComfyUI: each branch holds an `nn.Sequential` named
`linear` whose indices count the parameter-free layers (activations, dropout) too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from . import UserError

# A1111 and ComfyUI both map "swish" to Hardswish (not SiLU); using the same class keeps outputs equal.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "softsign": nn.Softsign, "mish": nn.Mish,
}
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def activation_class(name: str | None) -> type[nn.Module] | None:
    """The module class for an A1111 activation name; None for "linear" (no layer is added)."""
    if name is None or name == "linear":
        return None
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    # A1111 also accepts any torch.nn activation by its lower-cased class name (e.g. "gelu", "silu").
    extra = {n.lower(): c for n, c in inspect.getmembers(nn.modules.activation, inspect.isclass)
             if c.__module__ == nn.modules.activation.__name__}
    if name in extra:
        return extra[name]
    raise UserError(f"hypernetwork activation {name!r} is not supported "
                    f"(choose one of {', '.join(ACTIVATIONS)})")


@dataclass
class HypernetworkStructure:
    """The architecture of every branch: what A1111 stores beside the weights."""

    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation: str = "linear"
    layer_norm: bool = False
    activate_output: bool = False
    weight_init: str = "Normal"
    dropout_structure: list[float] = field(default_factory=list)  # empty = no dropout

    def __post_init__(self):
        self.layer_structure = [float(x) for x in self.layer_structure]
        self.dropout_structure = [float(x) for x in self.dropout_structure] or [0.0] * len(self.layer_structure)
        self.validate()

    def validate(self) -> None:
        """Raise a UserError for structures A1111 would refuse (or silently build differently)."""
        ls, ds = self.layer_structure, self.dropout_structure
        if len(ls) < 2 or ls[0] != 1 or ls[-1] != 1:
            raise UserError(f"hypernetwork layer_structure must start and end with 1 (e.g. 1,2,1), got {ls}")
        if any(x <= 0 for x in ls):
            raise UserError(f"hypernetwork layer_structure must be positive, got {ls}")
        if len(ds) != len(ls):
            raise UserError(f"hypernetwork dropout needs {len(ls)} values (one per layer_structure entry), "
                            f"got {ds}")
        if ds[0] != 0 or ds[-1] != 0 or any(not 0 <= p < 1 for p in ds):
            raise UserError(f"hypernetwork dropout values must lie in [0, 1) with 0 at both ends, got {ds}")
        if self.weight_init not in WEIGHT_INITS:
            raise UserError(f"hypernetwork weight_init {self.weight_init!r}: choose one of {', '.join(WEIGHT_INITS)}")
        activation_class(self.activation)

    @property
    def use_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_structure)

    @property
    def last_layer_dropout(self) -> bool:
        # A1111 derives the flag it saves from the structure in the same way.
        return self.dropout_structure[-2] != 0


def build_layers(dim: int, structure: HypernetworkStructure) -> list[nn.Module]:
    """The branch's layers in A1111's order: Linear, activation, LayerNorm, Dropout per step (on meta)."""
    ls, ds = structure.layer_structure, structure.dropout_structure
    act = activation_class(structure.activation)
    layers: list[nn.Module] = []
    for i in range(len(ls) - 1):
        width_in, width_out = int(dim * ls[i]), int(dim * ls[i + 1])
        # Built on the meta device: no memory or RNG is spent on a default init we overwrite anyway.
        layers.append(nn.Linear(width_in, width_out, device="meta"))
        is_last = i == len(ls) - 2
        if act is not None and (not is_last or structure.activate_output):
            layers.append(act())
        if structure.layer_norm:
            layers.append(nn.LayerNorm(width_out, device="meta"))
        if ds[i + 1] > 0:
            layers.append(nn.Dropout(p=ds[i + 1]))
    return layers


def init_weights(sequential: nn.Sequential, structure: HypernetworkStructure,
                 generator: torch.Generator | None = None) -> None:
    """A1111's initialisation: biases 0; Linear weights per weight_init; LayerNorm weights N(0, 0.01)."""
    nonlinearity = "leaky_relu" if structure.activation == "leakyrelu" else "relu"
    init = structure.weight_init
    for layer in sequential:
        if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
            continue
        weight = layer.weight.data
        nn.init.zeros_(layer.bias.data)
        # A1111 gives LayerNorm the "Normal" init whatever weight_init says; kept for identical starts.
        if init == "Normal" or isinstance(layer, nn.LayerNorm):
            nn.init.normal_(weight, 0.0, 0.01, generator=generator)
        elif init == "XavierUniform":
            nn.init.xavier_uniform_(weight, generator=generator)
        elif init == "XavierNormal":
            nn.init.xavier_normal_(weight, generator=generator)
        elif init == "KaimingUniform":
            nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity, generator=generator)
        else:
            nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity, generator=generator)


class HypernetworkBranch(nn.Module):
    """One residual MLP: out = x + linear(x) * strength (state-dict keys `linear.{index}.weight|bias`)."""

    def __init__(self, dim: int, structure: HypernetworkStructure, generator: torch.Generator | None = None):
        super().__init__()
        self.linear = nn.Sequential(*build_layers(dim, structure))
        self.linear.to_empty(device="cpu")
        init_weights(self.linear, structure, generator)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        weight = self.linear[0].weight
        h = x.to(device=weight.device, dtype=weight.dtype)  # networks stay float32 under a half-precision UNet
        for layer in self.linear:
            # Dropout only while training with autograd on: sampling inside a training run happens under
            # no_grad with the adapter still in train mode, and must be deterministic.
            if isinstance(layer, nn.Dropout) and not torch.is_grad_enabled():
                continue
            h = layer(h)
        return x + (h * strength).to(x.dtype)


class HypernetworkPair(nn.Module):
    """The K and V branches for one context width."""

    def __init__(self, dim: int, structure: HypernetworkStructure, generator: torch.Generator | None = None):
        super().__init__()
        self.k = HypernetworkBranch(dim, structure, generator)
        self.v = HypernetworkBranch(dim, structure, generator)


class Hypernetwork(nn.ModuleDict):
    """All pairs, keyed by the context width as a string; `strength` scales every residual.

    State-dict keys: `{dim}.k.linear.{index}.weight` (the safetensors layout sdft writes)."""

    def __init__(self, dims, structure: HypernetworkStructure, strength: float = 1.0,
                 generator: torch.Generator | None = None, name: str = "hypernetwork"):
        dims = [int(d) for d in dims]
        if not dims or any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
            raise UserError(f"hypernetwork dims must be distinct positive widths, got {dims}")
        super().__init__({str(d): HypernetworkPair(d, structure, generator) for d in dims})
        self.structure = structure
        self.strength = float(strength)
        self.name = name

    @property
    def dims(self) -> list[int]:
        return [int(k) for k in self.keys()]

    def pair_for(self, width: int) -> HypernetworkPair | None:
        """The pair for a context of this last dimension, or None (the layer stays unchanged)."""
        key = str(width)
        return self[key] if key in self else None


def context_dims(unet) -> list[int]:
    """Every attention context width of a UNet: cross-attention's first, then the self-attention widths."""
    from diffusers.models.attention_processor import Attention

    widths = {int(m.cross_attention_dim) for m in unet.modules() if isinstance(m, Attention)}
    cross = unet.config.get("cross_attention_dim")
    first = [int(cross)] if isinstance(cross, int) and cross in widths else []
    return first + sorted(widths - set(first))


class HypernetworkAttnProcessor:
    """diffusers' scaled-dot-product attention with the hypernetworks applied to the key/value inputs.

    Deliberately not an nn.Module: diffusers would register it (and the networks) inside the UNet,
    and the networks would then leak into the UNet's state dict and parameters."""

    def __init__(self, original, networks: list[Hypernetwork]):
        self.original = original  # restored by remove(); also used where no network applies
        self.networks = networks  # shared by every processor of a UNet; applied in order, like A1111

    def _active(self, width: int) -> list[tuple[HypernetworkPair, float]]:
        found = [(hn.pair_for(width), hn.strength) for hn in self.networks if hn.strength != 0]
        return [(pair, s) for pair, s in found if pair is not None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        source = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        width = source.shape[1] if source.ndim == 4 else source.shape[-1]
        active = self._active(width)
        if not active:
            # Bit-exact base output at strength 0 and for widths without a network.
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width_px = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width_px).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # queries are untouched
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key_in, value_in = context, context
        for pair, strength in active:
            key_in, value_in = pair.k(key_in, strength), pair.v(value_in, strength)
        # Calling attn.to_k/to_v (not their weights) keeps peft LoRA layers wrapped around them working.
        key, value = attn.to_k(key_in), attn.to_v(value_in)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # Same call as diffusers' AttnProcessor2_0, so a zero network reproduces the base bit for bit.
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                       dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width_px)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _unet(pipe_or_unet):
    return getattr(pipe_or_unet, "unet", pipe_or_unet)


def installed(pipe_or_unet) -> list[Hypernetwork]:
    """The hypernetworks installed on a UNet (or a pipeline's UNet), in application order."""
    procs = _unet(pipe_or_unet).attn_processors.values()
    return next((p.networks for p in procs if isinstance(p, HypernetworkAttnProcessor)), [])


def install(pipe_or_unet, hypernetwork: Hypernetwork, strength: float | None = None) -> None:
    """Apply `hypernetwork` in every attention layer; stacks after any already installed (as A1111 does)."""
    unet = _unet(pipe_or_unet)
    if strength is not None:
        hypernetwork.strength = float(strength)
    networks = installed(unet)
    if networks:
        if not any(hn is hypernetwork for hn in networks):
            networks.append(hypernetwork)
        return
    networks.append(hypernetwork)
    unet.set_attn_processor({name: HypernetworkAttnProcessor(proc, networks)
                             for name, proc in unet.attn_processors.items()})


def remove(pipe_or_unet) -> None:
    """Uninstall every hypernetwork: the original attention processors come back."""
    unet = _unet(pipe_or_unet)
    procs = unet.attn_processors
    if any(isinstance(p, HypernetworkAttnProcessor) for p in procs.values()):
        unet.set_attn_processor({name: p.original if isinstance(p, HypernetworkAttnProcessor) else p
                                 for name, p in procs.items()})


def set_strength(pipe_or_unet, strength: float) -> None:
    """Set the strength of every installed hypernetwork (0 = the base model exactly)."""
    for hn in installed(pipe_or_unet):
        hn.strength = float(strength)
