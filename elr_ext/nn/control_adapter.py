"""Stage II's local control adapter (section 2.4): Uni-ControlNet's local adapter on a diffusers
UNet2DConditionModel, with the copied encoder adapted by Kronecker LoRA (eq. 9) instead of being
trained whole.

    adapter = LocalControlAdapter.from_unet(unet, condition_channels=[1, 3])   # edges + segmentation
    down, mid = adapter(sample, t, text_states, condition)
    eps = unet(sample, t, text_states, down_block_additional_residuals=down,
               mid_block_additional_residual=mid).sample

What the adapter holds (Uni-ControlNet's LocalAdapter, models/local_adapter.py, mapped onto diffusers):
- a copy of the backbone's conv_in, time embedding, down blocks and mid block, with their weights;
  adapter="kron": the copy is frozen and every nn.Linear / nn.Conv2d in it carries a trainable
  Kronecker update (KronLoRALinear / KronLoRAConv2d); adapter="full": the whole copy trains
  (Uni-ControlNet exactly, the baseline every efficiency figure is measured against);
- a condition feature extractor: strided 3x3 convs with SiLU from the condition maps (several maps
  concatenated on channels) down to the latent scale of every down level, a zero-initialised 3x3
  conv last at each scale;
- in the first resnet of every down level the two GroupNorms are replaced by FDN (eq. 8) of those
  features: FDN -> SiLU -> conv -> +time -> FDN -> SiLU -> dropout -> conv, plus the skip;
- a zero-initialised 1x1 conv on every down-block output (the residuals the UNet's decoder takes
  through its skip connections, conv_in's output first) and on the mid block's output.

Zero convs make every residual exactly zero at initialisation, so the controlled model starts as the
backbone. A backbone decomposed by elr_ext.decompose keeps its low-rank format in the copy (paper
2.4: F' and M' inherit it). In kron mode each low-rank layer W = up @ down of the copy becomes its
two plain layers (down: in -> rank, up: rank -> out) and each carries its own Kronecker update:
the update stays in the low-rank format, merges back exactly, and no dense out x in weight (nor a
dense convolution) is ever built; the alternative, one Kronecker update of the dense equivalent,
would cost a full dense convolution per layer. In full mode the low-rank layers train as they are.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import reference
from .._checks import check_choice, check_positive_int, check_tensor
from .counting import count_parameters
from .fdn import FDN
from .kron_lora import KronLoRAConv2d, KronLoRALinear, kronecker_splits

try:  # diffusers is a dependency of the model layer only; the ops work without it
    from diffusers import ModelMixin, UNet2DConditionModel
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.resnet import ResnetBlock2D
except ImportError as exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError("elr_ext.nn.LocalControlAdapter needs diffusers (pip install diffusers)") from exc

Condition = Union[torch.Tensor, Sequence[torch.Tensor]]
_KRON = (KronLoRALinear, KronLoRAConv2d)
# The backbone modules the adapter copies (time_proj and add_time_proj have no weights; time_embed_act
# is usually None; add_time_proj / add_embedding exist for addition_embed_type="text_time", SDXL's).
_COPIED = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "time_embed_act",
           "down_blocks", "mid_block")


class FDNResnetBlock(nn.Module):
    """A copied diffusers ResnetBlock2D whose two GroupNorms are replaced by FDN of the condition
    features (Uni-ControlNet's LocalResBlock):

        h = conv1(silu(FDN(x, c))) + time_emb_proj(silu(temb))
        out = (skip(x) + conv2(dropout(silu(FDN(h, c))))) / output_scale_factor

    Called by the down block exactly as the resnet it replaces, `(hidden_states, temb)`; the
    adapter sets `features` (the level's condition features) around that call, so the diffusers
    block's own forward, whatever its type, runs unchanged.

    fused=True runs FDN + SiLU as the one fused op (elr_ext.fdn); fused=False as eager PyTorch
    (group_norm, mul, add, silu: Uni-ControlNet's FDN.forward), the baseline of the full mode."""

    def __init__(self, resnet: ResnetBlock2D, feature_channels: int, fused: bool = True):
        super().__init__()
        if type(resnet) is not ResnetBlock2D:
            raise ValueError(f"FDN injection needs a diffusers ResnetBlock2D, got {type(resnet).__name__}")
        if resnet.up or resnet.down or resnet.time_embedding_norm != "default":
            raise ValueError("FDN injection supports ResnetBlock2D with up=down=False and time_embedding_norm="
                             f"'default' (Stable Diffusion's); got up={resnet.up}, down={resnet.down}, "
                             f"time_embedding_norm={resnet.time_embedding_norm!r}")
        if not isinstance(resnet.nonlinearity, nn.SiLU):
            raise ValueError(f"FDN injection fuses SiLU; the resnet uses {type(resnet.nonlinearity).__name__}")
        self.in_channels, self.out_channels = resnet.in_channels, resnet.out_channels
        self.fused = fused
        # The norms' affine weights are dropped: FDN normalises without them, as Uni-ControlNet's.
        self.fdn1 = FDN(resnet.in_channels, feature_channels, resnet.norm1.num_groups, resnet.norm1.eps, "silu")
        self.fdn2 = FDN(resnet.conv1.out_channels, feature_channels, resnet.norm2.num_groups, resnet.norm2.eps,
                        "silu")
        self.conv1, self.time_emb_proj = resnet.conv1, resnet.time_emb_proj
        self.dropout, self.conv2, self.conv_shortcut = resnet.dropout, resnet.conv2, resnet.conv_shortcut
        self.nonlinearity = resnet.nonlinearity
        self.skip_time_act = resnet.skip_time_act
        self.output_scale_factor = resnet.output_scale_factor
        self.features: Optional[torch.Tensor] = None

    def _fdn(self, fdn: FDN, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fdn(z, features)
        return reference.fdn_eager(z, fdn.conv_gamma(features), fdn.conv_beta(features), fdn.num_groups, fdn.eps,
                                   fdn.activation)

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor], *args, **kwargs) -> torch.Tensor:
        features = self.features
        if features is None:
            raise RuntimeError("FDNResnetBlock runs inside LocalControlAdapter.forward, which sets its features")
        h = self.conv1(self._fdn(self.fdn1, input_tensor, features))
        if self.time_emb_proj is not None and temb is not None:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            h = h + self.time_emb_proj(t)[:, :, None, None]
        h = self.conv2(self.dropout(self._fdn(self.fdn2, h, features)))
        skip = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (skip + h) / self.output_scale_factor


class ConditionFeatureExtractor(nn.Module):
    """Uni-ControlNet's FeatureExtractor generalised to any UNet: from the condition maps at image
    resolution, 3x3 convs with SiLU, halving the size log2(latent_factor) times (the last halving
    lands on level 0's channels), then one 3x3 conv per further level (stride 2 where the UNet
    halves), each level's features through a zero-initialised 3x3 conv.

    For Stable Diffusion (factor 8) with extractor_channels (32, 64, 128) this is Uni-ControlNet's
    layout: 32, 64/2, 64, 128/2, 128, then feature_channels[0]/2, feature_channels[1]/2, ..."""

    def __init__(self, condition_channels: int, feature_channels: Sequence[int], level_strides: Sequence[int],
                 latent_factor: int, extractor_channels: Sequence[int]):
        super().__init__()
        halvings = int(math.log2(latent_factor))
        layers: List[nn.Module] = [nn.Conv2d(condition_channels, extractor_channels[0], 3, padding=1), nn.SiLU()]
        channels = extractor_channels[0]
        for k in range(halvings - 1):  # Uni-ControlNet's pre_extractor: stride-2 conv, then a 3x3 conv
            nxt = extractor_channels[min(k + 1, len(extractor_channels) - 1)]
            layers += [nn.Conv2d(channels, nxt, 3, padding=1, stride=2), nn.SiLU(),
                       nn.Conv2d(nxt, nxt, 3, padding=1), nn.SiLU()]
            channels = nxt
        self.stem = nn.Sequential(*layers)
        strides = [2 if halvings > 0 else 1] + list(level_strides[1:])
        self.levels = nn.ModuleList()
        self.zero_convs = nn.ModuleList()
        for stride, out in zip(strides, feature_channels):
            self.levels.append(nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, stride=stride), nn.SiLU()))
            self.zero_convs.append(_zero_conv(out, out, 3))
            channels = out

    def forward(self, condition: torch.Tensor) -> List[torch.Tensor]:
        h = self.stem(condition)
        features = []
        for level, zero_conv in zip(self.levels, self.zero_convs):
            h = level(h)
            features.append(zero_conv(h))
        return features


def _zero_conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _unet_config(unet_config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet_config).items() if not k.startswith("_")}


def _run_down_block(block: nn.Module, hidden, emb, encoder_hidden_states, level_features):
    """One copied down block with the condition features injected into its first resnet's FDN;
    returns (hidden, *states)."""
    injected = block.resnets[0]
    injected.features = level_features
    try:
        if getattr(block, "has_cross_attention", False):
            hidden, states = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, states = block(hidden_states=hidden, temb=emb)
    finally:
        injected.features = None  # no tensor (and its graph) outlives the call
    return (hidden, *states)


def _run_mid_block(block: nn.Module, hidden, emb, encoder_hidden_states):
    if getattr(block, "has_cross_attention", False):
        return block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
    return block(hidden, emb)


class LocalControlAdapter(ModelMixin, ConfigMixin):
    """Uni-ControlNet's local control adapter for a diffusers UNet2DConditionModel (section 2.4).

    Build it from the backbone with `from_unet`; the constructor rebuilds the same structure from the
    config alone (what `from_pretrained` does).

    Args:
        unet_config: the backbone's config (UNet2DConditionModel.config as a dict).
        condition_channels: channels of the condition, or a list with the channels of each map when
            several are concatenated (e.g. [1, 3]: an edge map and an RGB segmentation map).
        adapter: "kron" (copy frozen, Kronecker LoRA on every linear / conv of it) or "full" (the whole
            copy trains, FDN in eager PyTorch: Uni-ControlNet).
        terms, rank, alpha: the Kronecker updates' T, r and scale alpha / r (eq. 9; kron only).
        factor: how each layer's dimensions split (elr_ext.nn.kronecker_splits): None is eq. 9 with
            A_t of n x n, n = terms; an int n is eq. 9 with that n; -1 is LoKr's balanced split. A
            dimension n does not divide (the ranks of a decomposed backbone: 107, 213, ...) takes its
            divisor nearest to n.
        latent_factor: image size / latent size: 1 in pixel space, 8 for Stable Diffusion's VAE.
        feature_channels: channels of the condition features per down level (default: the UNet's
            block_out_channels).
        extractor_channels: channels of the extractor's layers above the latent scale
            (Uni-ControlNet: 32, 64, 128).
        decomposition: for a backbone decomposed by elr_ext.decompose, its decomposition config
            (per-layer kind and rank, `unet._elr_decompose_config`), so that from_pretrained can
            rebuild the low-rank structure (from_unet fills it in).
        source_unet: the backbone to copy the weights from (from_unet passes it; not in the config).
    """

    # from_unet hands the backbone itself over; the config rebuilds its structure without it.
    ignore_for_config = ["source_unet"]
    _supports_gradient_checkpointing = True  # per copied block: enable_gradient_checkpointing below

    @register_to_config
    def __init__(self, unet_config: dict, condition_channels: Union[int, Sequence[int]] = 3, adapter: str = "kron",
                 terms: int = 4, rank: int = 8, alpha: Optional[float] = None, factor: Optional[int] = None,
                 latent_factor: int = 1, feature_channels: Optional[Sequence[int]] = None,
                 extractor_channels: Sequence[int] = (32, 64, 128), decomposition: Optional[dict] = None,
                 source_unet: Optional[UNet2DConditionModel] = None):
        super().__init__()
        check_choice("adapter", adapter, ("kron", "full"))
        check_positive_int("latent_factor", latent_factor)
        if latent_factor & (latent_factor - 1):
            raise ValueError(f"latent_factor must be a power of 2 (1 in pixel space, 8 for SD's VAE), got {latent_factor}")
        channel_list = [condition_channels] if isinstance(condition_channels, int) else list(condition_channels)
        for c in channel_list:
            check_positive_int("condition_channels", c)
        self.condition_channel_list = channel_list
        self.total_condition_channels = sum(channel_list)

        unet = source_unet if source_unet is not None else _rebuild_unet(unet_config, decomposition)
        _check_supported(unet)
        block_out = list(unet.config.block_out_channels)
        feature_channels = list(feature_channels or block_out)
        if len(feature_channels) != len(unet.down_blocks):
            raise ValueError(f"feature_channels needs one entry per down block ({len(unet.down_blocks)}), "
                             f"got {feature_channels}")

        # The copy: the encoder half of the backbone with its weights.
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.time_embed_act = copy.deepcopy(unet.time_embed_act)
        # SDXL's added embedding (pooled text + micro-conditioning time ids): copied, adapted as the rest
        text_time = unet.config.addition_embed_type == "text_time"
        self.add_time_proj = copy.deepcopy(unet.add_time_proj) if text_time else None
        self.add_embedding = copy.deepcopy(unet.add_embedding) if text_time else None
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        self.disable_gradient_checkpointing()  # the copies keep no checkpointing of the UNet's blocks

        # Scale of each level's input (2 ** downsamplers before it) decides the extractor's strides.
        scales = [1]
        for block in self.down_blocks:
            scales.append(scales[-1] * (2 if getattr(block, "downsamplers", None) else 1))
        self.total_downsampling = scales[-1]
        level_strides = [1] + [scales[i] // scales[i - 1] for i in range(1, len(self.down_blocks))]
        residual_channels = self._residual_channels()
        mid_channels = self.mid_block.resnets[-1].out_channels

        # FDN in the first resnet of every level: eager in full mode (Uni-ControlNet), fused in kron.
        for block, channels in zip(self.down_blocks, feature_channels):
            block.resnets[0] = FDNResnetBlock(block.resnets[0], channels, fused=adapter == "kron")

        if adapter == "kron":
            for p in self._copy_parameters():
                p.requires_grad_(False)
            for parent, name, layer in _low_rank_layers(self, _COPIED):
                setattr(parent, name, _as_two_layers(layer))
            for parent, name, layer in _adaptable_layers(self, _COPIED):
                wrapper = KronLoRALinear if isinstance(layer, nn.Linear) else KronLoRAConv2d
                out_split, in_split = kronecker_splits(layer.weight.shape[0], layer.weight[0].numel(), terms, factor,
                                                       strict=False)
                setattr(parent, name, wrapper(layer, terms=terms, rank=rank, alpha=alpha, out_factors=out_split,
                                              in_factors=in_split))

        self.feature_extractor = ConditionFeatureExtractor(self.total_condition_channels, feature_channels,
                                                           level_strides, latent_factor, extractor_channels)
        self.down_zero_convs = nn.ModuleList(_zero_conv(c, c, 1) for c in residual_channels)
        self.mid_zero_conv = _zero_conv(mid_channels, mid_channels, 1)
        self._set_trainable()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, condition_channels: Union[int, Sequence[int]] = 3,
                  adapter: str = "kron", terms: int = 4, rank: int = 8, alpha: Optional[float] = None,
                  factor: Optional[int] = None, latent_factor: int = 1, feature_channels: Optional[Sequence[int]] = None,
                  extractor_channels: Sequence[int] = (32, 64, 128)) -> "LocalControlAdapter":
        """The adapter for `unet` (dense or decomposed by elr_ext.decompose), its copy initialised
        from unet's weights. unet itself is not changed. The copy and its Kronecker factors keep
        unet's device and dtype; the FDN convs, feature extractor and zero convs are created on the
        default device in the default dtype: move the adapter with .to() as a whole."""
        return cls(unet_config=_unet_config(unet.config), condition_channels=condition_channels, adapter=adapter,
                   terms=terms, rank=rank, alpha=alpha, factor=factor, latent_factor=latent_factor,
                   feature_channels=feature_channels, extractor_channels=extractor_channels,
                   decomposition=getattr(unet, "_elr_decompose_config", None), source_unet=unet)

    def _copy_modules(self) -> List[nn.Module]:
        return [getattr(self, name) for name in _COPIED if getattr(self, name) is not None]

    def _copy_parameters(self) -> List[nn.Parameter]:
        """Parameters of the copied backbone part (not the FDN convs, not the Kronecker factors)."""
        fdn_params = {id(p) for m in self.modules() if isinstance(m, FDN) for p in m.parameters()}
        kron_params = {id(getattr(m, n)) for m in self.modules() if isinstance(m, _KRON) for n in ("A", "U", "V")}
        return [p for m in self._copy_modules() for p in m.parameters()
                if id(p) not in fdn_params and id(p) not in kron_params]

    def _residual_channels(self) -> List[int]:
        """Channels of every tensor the UNet keeps for its decoder's skips: conv_in's output, then
        each down block's resnet outputs and its downsampler's."""
        channels = [self.conv_in.out_channels]
        for block in self.down_blocks:
            channels += [r.out_channels for r in block.resnets]
            if getattr(block, "downsamplers", None):
                channels += [d.out_channels for d in block.downsamplers]
        return channels

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """Recompute each copied block's activations in the backward (torch.utils.checkpoint,
        non-reentrant) instead of keeping them: less memory for one more forward of the copy. Per
        copied block, with its condition features passed in again; diffusers' checkpointing inside
        the blocks stays off (it would recompute the first resnet without its features)."""
        if gradient_checkpointing_func is not None:
            raise ValueError("gradient_checkpointing_func is not supported: the adapter checkpoints each block with "
                             "torch.utils.checkpoint (non-reentrant)")
        self.disable_gradient_checkpointing()
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
        self.gradient_checkpointing = False

    def named_trainable_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        """kron: the Kronecker factors, the FDN convs, the feature extractor and the zero convs;
        full: every parameter (the copy as well)."""
        if self.config.adapter == "full":
            return list(self.named_parameters())
        trainable_modules = [m for m in self.modules() if isinstance(m, FDN)]
        trainable_modules += [self.feature_extractor, self.down_zero_convs, self.mid_zero_conv]
        ids = {id(p) for m in trainable_modules for p in m.parameters()}
        ids |= {id(getattr(m, n)) for m in self.modules() if isinstance(m, _KRON) for n in ("A", "U", "V")}
        return [(name, p) for name, p in self.named_parameters() if id(p) in ids]

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def _set_trainable(self) -> None:
        trainable = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)

    def parameter_counts(self) -> dict:
        """Trainable and total parameters, and where they are."""
        kron = [getattr(m, n) for m in self.modules() if isinstance(m, _KRON) for n in ("A", "U", "V")]
        return {
            "trainable": count_parameters(self.trainable_parameters()),
            "total": count_parameters(self),
            "copy": count_parameters(self._copy_parameters()),
            "kronecker_factors": count_parameters(kron),
            "fdn_convs": count_parameters(*(m for m in self.modules() if isinstance(m, FDN))),
            "feature_extractor": count_parameters(self.feature_extractor),
            "zero_convs": count_parameters(self.down_zero_convs, self.mid_zero_conv),
        }

    # ------------------------------------------------------------------ merge for inference
    def kron_layers(self) -> List[nn.Module]:
        return [m for m in self.modules() if isinstance(m, _KRON)]

    def merge_kron(self) -> None:
        """Fold every Kronecker update into its frozen weight: the copy then runs as plain layers."""
        for layer in self.kron_layers():
            layer.merge()

    def unmerge_kron(self) -> None:
        for layer in self.kron_layers():
            layer.unmerge()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # A merged weight holds W + dW while the factors still hold dW: saved together they load as
        # W + 2 dW. Refuse rather than silently round-trip through unmerge (W + dW - dW != W in fp32).
        if any(layer.merged for layer in self.kron_layers()):
            raise ValueError("the Kronecker updates are merged; call unmerge_kron() before save_pretrained")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "LocalControlAdapter":
        model = super().from_pretrained(*args, **kwargs)
        model._set_trainable()  # loading replaces the parameters; which ones train is structural
        return model

    # ------------------------------------------------------------------ forward
    def prepare_condition(self, condition: Condition, sample: torch.Tensor) -> torch.Tensor:
        """Concatenate the condition maps, check their channels, resize them to the image size of
        `sample` (latent size x latent_factor) and match its batch, dtype and device."""
        if isinstance(condition, (list, tuple)):
            if len(condition) != len(self.condition_channel_list):
                raise ValueError(f"condition has {len(condition)} maps; the adapter expects "
                                 f"{len(self.condition_channel_list)} with channels {self.condition_channel_list}")
            for i, (c, expected) in enumerate(zip(condition, self.condition_channel_list)):
                check_tensor(f"condition[{i}]", c, dim=4)
                if c.shape[1] != expected:
                    raise ValueError(f"condition[{i}] has {c.shape[1]} channels; the adapter expects {expected} "
                                     f"(condition_channels={self.condition_channel_list})")
            condition = torch.cat(list(condition), dim=1)
        check_tensor("condition", condition, dim=4)
        if condition.shape[1] != self.total_condition_channels:
            raise ValueError(f"condition has {condition.shape[1]} channels; the adapter expects "
                             f"{self.total_condition_channels} (condition_channels={self.condition_channel_list})")
        if condition.shape[0] not in (1, sample.shape[0]):
            raise ValueError(f"condition has batch {condition.shape[0]}; expected 1 or the sample's {sample.shape[0]}")
        condition = condition.to(device=sample.device, dtype=sample.dtype)
        size = tuple(s * self.config.latent_factor for s in sample.shape[-2:])
        if tuple(condition.shape[-2:]) != size:
            condition = F.interpolate(condition, size=size, mode="bilinear", align_corners=False, antialias=True)
        return condition.expand(sample.shape[0], -1, -1, -1)

    def _time_embedding(self, timestep, sample: torch.Tensor, added_cond_kwargs: Optional[dict]) -> torch.Tensor:
        # As UNet2DConditionModel.get_time_embed + time_embedding + get_aug_embed ("text_time").
        if not torch.is_tensor(timestep):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(sample.device)
        t_emb = self.time_proj(timestep.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_embedding is not None:
            emb = emb + self._added_embedding(added_cond_kwargs, sample.shape[0], emb.dtype)
        elif added_cond_kwargs:
            raise ValueError("added_cond_kwargs was given but the UNet has no addition_embed_type to take it")
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    def _added_embedding(self, added_cond_kwargs: Optional[dict], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """SDXL's added embedding: add_embedding(concat(text_embeds, add_time_proj(time_ids)))."""
        missing = [k for k in ("text_embeds", "time_ids") if not added_cond_kwargs or added_cond_kwargs.get(k) is None]
        if missing:
            raise ValueError(f"the UNet has addition_embed_type='text_time': added_cond_kwargs needs "
                             f"{' and '.join(repr(k) for k in missing)} (the pooled text embedding [N, D] and "
                             "the micro-conditioning time ids [N, 6])")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        check_tensor("added_cond_kwargs['text_embeds']", text_embeds, dim=2)
        check_tensor("added_cond_kwargs['time_ids']", time_ids, dim=2)
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if value.shape[0] != batch:
                raise ValueError(f"added_cond_kwargs['{name}'] has batch {value.shape[0]}; the sample has {batch}")
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)
        expected = self.config.unet_config["projection_class_embeddings_input_dim"]
        width = text_embeds.shape[1] + time_embeds.shape[1]
        if width != expected:
            raise ValueError(f"added_cond_kwargs: text_embeds ({text_embeds.shape[1]}) + time ids "
                             f"({time_ids.shape[1]} x {self.config.unet_config['addition_time_embed_dim']}) give "
                             f"{width} features; the UNet's add_embedding takes {expected}")
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, condition: Condition,
                conditioning_scale: float = 1.0, added_cond_kwargs: Optional[dict] = None
                ) -> Tuple[Tuple[torch.Tensor, ...], torch.Tensor]:
        """Residuals for the frozen UNet: `(down_block_additional_residuals, mid_block_additional_residual)`.

        sample: the noisy latent [N, in_channels, h, w], h and w divisible by the UNet's total
        downsampling; condition: [N or 1, condition_channels, H, W] (or a list of maps), resized to
        (h, w) * latent_factor when it differs; added_cond_kwargs: for an SDXL UNet
        (addition_embed_type="text_time"), {"text_embeds": [N, D], "time_ids": [N, 6]} exactly as
        UNet2DConditionModel takes them."""
        check_tensor("sample", sample, dim=4)
        in_channels = self.config.unet_config["in_channels"]
        if sample.shape[1] != in_channels:
            raise ValueError(f"sample has {sample.shape[1]} channels; the UNet takes {in_channels}")
        h, w = sample.shape[-2:]
        if h % self.total_downsampling or w % self.total_downsampling:
            factor = self.total_downsampling * self.config.latent_factor
            raise ValueError(f"latent size {h}x{w} is not divisible by the UNet's total downsampling "
                             f"{self.total_downsampling}: the image size must be a multiple of {factor}")
        condition = self.prepare_condition(condition, sample)
        emb = self._time_embedding(timestep, sample, added_cond_kwargs)
        features = self.feature_extractor(condition)

        hidden = self.conv_in(sample)
        residuals = [hidden]
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for block, level_features in zip(self.down_blocks, features):
            if checkpointing:  # the block's activations recomputed in the backward, its features passed in again
                hidden, *states = checkpoint(_run_down_block, block, hidden, emb, encoder_hidden_states,
                                             level_features, use_reentrant=False)
            else:
                hidden, *states = _run_down_block(block, hidden, emb, encoder_hidden_states, level_features)
            residuals.extend(states)
        if checkpointing:
            hidden = checkpoint(_run_mid_block, self.mid_block, hidden, emb, encoder_hidden_states, use_reentrant=False)
        else:
            hidden = _run_mid_block(self.mid_block, hidden, emb, encoder_hidden_states)

        down = tuple(zero_conv(r) * conditioning_scale for zero_conv, r in zip(self.down_zero_convs, residuals))
        mid = self.mid_zero_conv(hidden) * conditioning_scale
        return down, mid


def _check_supported(unet) -> None:
    """The UNet features the adapter reproduces: SD 1.x / 2.x and SDXL-like backbones."""
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    cfg = unet.config
    unsupported = {
        "class_embed_type / num_class_embeds": getattr(unet, "class_embedding", None) is not None,
        f"addition_embed_type={cfg.addition_embed_type!r} (only 'text_time', SDXL's, is supported)":
            cfg.addition_embed_type not in (None, "text_time"),
        "time_cond_proj_dim": cfg.time_cond_proj_dim is not None,
        "encoder_hid_dim": getattr(unet, "encoder_hid_proj", None) is not None,
        "center_input_sample": bool(cfg.center_input_sample),
        "mid_block_type None": unet.mid_block is None,
    }
    bad = [name for name, present in unsupported.items() if present]
    if bad:
        raise ValueError(f"LocalControlAdapter does not support UNets with {', '.join(bad)}")
    for i, block in enumerate(unet.down_blocks):
        if not getattr(block, "resnets", None):
            raise ValueError(f"down block {i} ({type(block).__name__}) has no resnets to inject FDN into")


def _find_layers(root: nn.Module, names: Sequence[str], wanted: tuple, skip: tuple = ()):
    """(parent, attribute, layer) for every module of the `wanted` types among root's children
    `names` and below, not descending into `wanted` layers or into modules of the `skip` types."""
    found = []

    def visit(parent: nn.Module, name: str, child: nn.Module) -> None:
        if child is None or (skip and isinstance(child, skip)):
            return
        if isinstance(child, wanted):
            found.append((parent, name, child))
            return
        for grandchild_name, grandchild in child.named_children():
            visit(child, grandchild_name, grandchild)

    for name in names:
        visit(root, name, getattr(root, name))
    return found


def _adaptable_layers(root: nn.Module, names: Sequence[str]):
    """nn.Linear / nn.Conv2d layers among root's children `names` and below, not inside an FDN (whose
    convs are new and train whole) nor already adapted."""
    return _find_layers(root, names, (nn.Linear, nn.Conv2d), skip=(FDN,) + _KRON)


def _low_rank_layers(root: nn.Module, names: Sequence[str]):
    """LowRankLinear / LowRankConv2d layers (elr_ext.decompose's) among root's children `names` and below."""
    try:
        from .lowrank import LowRankConv2d, LowRankLinear
    except ImportError:  # no low-rank layers in this installation: none can be in the model
        return []
    return _find_layers(root, names, (LowRankLinear, LowRankConv2d))


@torch.no_grad()
def _as_two_layers(layer: nn.Module) -> nn.Sequential:
    """A low-rank layer W = up @ down as the two plain layers it computes: `down` (in -> rank, for a
    conv with the original kernel, stride, padding and dilation) then `up` (rank -> out, 1x1 for a
    conv, carrying the bias). Same function, same parameter count, the same weights; each piece can
    then carry its own Kronecker update, which merges back exactly and keeps the low-rank format
    (no dense out x in weight is ever built)."""
    from .lowrank import LowRankLinear

    kw = {"device": layer.down.device, "dtype": layer.down.dtype}
    has_bias = layer.bias is not None
    if isinstance(layer, LowRankLinear):
        down = nn.Linear(layer.in_features, layer.rank, bias=False, **kw)
        up = nn.Linear(layer.rank, layer.out_features, bias=has_bias, **kw)
    else:  # LowRankConv2d
        down = nn.Conv2d(layer.in_channels, layer.rank, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, bias=False, padding_mode=layer.padding_mode, **kw)
        up = nn.Conv2d(layer.rank, layer.out_channels, 1, bias=has_bias, **kw)
    down.weight.copy_(layer.down)
    up.weight.copy_(layer.up)
    if has_bias:
        up.bias.copy_(layer.bias)
    pieces = nn.Sequential(OrderedDict(down=down, up=up))
    pieces.requires_grad_(False)
    return pieces.train(layer.training)


def _rebuild_unet(unet_config: dict, decomposition: Optional[dict]):
    unet = UNet2DConditionModel.from_config(unet_config)
    if decomposition:
        from ..decompose import apply_decomposition_config

        apply_decomposition_config(unet, decomposition)
    return unet
