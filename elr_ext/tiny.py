"""The tiny built-in configuration: a text-to-image model small enough that a training step runs in
well under a second on one CPU core. Tests, the training application's default run and the
evaluation scripts all build their models here, from configs with random weights: nothing is
downloaded.

    unet = tiny_unet()                    # pixel space: 3 -> 3 channels, 32 x 32 images
    text_encoder = tiny_text_encoder()    # CLIPTextModel, hidden 32, 2 layers
    tokenizer = tiny_tokenizer()          # CLIPTokenizer over a small caption vocabulary
    scheduler = tiny_scheduler()          # DDPM, 1000 training steps
    vae = tiny_vae()                      # optional: a 4-channel latent space, factor 2

Sizes (measured with `count_parameters`, diffusers 0.42 / transformers 5.24):

    tiny_unet()          UNet2DConditionModel, 3 levels (32, 64, 64), 1 resnet per level,
                         cross-attention in levels 2 and 3 and the mid block, total
                         downsampling 4 (32 x 32 image -> 8 x 8 at the bottom)           1,658,403 params
                         one AdamW step, batch 4, one CPU thread: 0.32 s (forward 0.09 s)
    tiny_text_encoder()  CLIPTextModel hidden 32, 2 layers, 4 heads, 32 positions          29,696 params
    tiny_tokenizer()     CLIPTokenizer, 360 tokens (characters, whole-word BPE merges for
                         CAPTION_WORDS, the 2 special tokens), model_max_length 32
    tiny_vae()           AutoencoderKL (32, 64), latent 4 channels, factor 2               658,375 params

Latent space: `tiny_unet(in_channels=4, out_channels=4, sample_size=16)` with `tiny_vae()`.

Family-shaped variants (TINY_VARIANTS; `train.py --architecture tiny-sd15|tiny-sdxl`), both in
tiny_vae()'s latent space (32 x 32 images, 16 x 16 latents), sized so a training step stays cheap:

    tiny-sd15   SD 1.x's layout: cross-attention in every level but the last, conv projections in the
                transformers, one CLIP text encoder, epsilon prediction
    tiny-sdxl   SDXL's layout: no attention in the first level, 1 / 2 transformer layers in the
                others, linear projections, two text encoders (CLIPTextModel + CLIPTextModelWithProjection)
                whose penultimate states are concatenated (cross_attention_dim 64), the second's pooled
                embedding and six micro-conditioning time ids added to the time embedding (text_time)
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from .nn.counting import count_parameters  # noqa: F401  (re-exported: the sizes above are its counts)

# Captions the synthetic data and the tests use ("a red circle and a blue square on a gray
# background"): each word becomes one token, anything else falls back to characters.
CAPTION_WORDS = (
    "a an the and on in of with at to by is are this that photo picture image drawing sketch of "
    "red green blue yellow orange purple pink brown black white gray grey dark light bright "
    "circle square triangle rectangle star line lines dot dots shape shapes ring cross "
    "small large big tiny left right top bottom center middle corner background foreground "
    "one two three four five six seven eight nine ten "
    "cat dog house tree car sky sea road person face flower mountain"
).split()

# Characters the tokenizer knows on their own (CLIP lower-cases text before tokenising).
BASE_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 32

TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    # Attention only at 16 x 16 and 8 x 8: attention at the full 32 x 32 made a training step 3.5x
    # slower on the CPU (1.10 s against 0.32 s, batch 4, one thread). Both block kinds, with and
    # without downsampler, still occur, as in Stable Diffusion.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


# SD 1.x's layout at tiny size (latent space of tiny_vae: 16 x 16 latents).
TINY_SD15_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
# SDXL's layout at tiny size: both text encoders' states concatenated (32 + 32), the pooled embedding
# (32) and 6 time ids of TINY_ADDITION_TIME_EMBED_DIM each into the added embedding.
TINY_ADDITION_TIME_EMBED_DIM = 8
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, cross_attention_dim=64,
    attention_head_dim=(2, 4, 4), norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=32 + 6 * TINY_ADDITION_TIME_EMBED_DIM,
)
# variant name -> (UNet config, text encoders: "clip" a CLIPTextModel, "clip_projection" a
# CLIPTextModelWithProjection, prediction type)
TINY_VARIANTS = {
    "tiny-sd15": (TINY_SD15_UNET_CONFIG, ("clip",), "epsilon"),
    "tiny-sdxl": (TINY_SDXL_UNET_CONFIG, ("clip", "clip_projection"), "epsilon"),
}


def tiny_unet(**overrides):
    """UNet2DConditionModel with TINY_UNET_CONFIG, any key overridden (e.g. in_channels=4,
    out_channels=4, sample_size=16 for the latent space of tiny_vae)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})


def tiny_variant_unet(name: str, **overrides):
    """The UNet of a TINY_VARIANTS entry ("tiny-sd15", "tiny-sdxl"), any key overridden."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**_variant(name)[0], **overrides})


def tiny_variant_text_encoders(name: str) -> list:
    """The text encoder(s) of a TINY_VARIANTS entry: [CLIPTextModel] or, for tiny-sdxl,
    [CLIPTextModel, CLIPTextModelWithProjection]."""
    return [tiny_text_encoder(projection=kind == "clip_projection") for kind in _variant(name)[1]]


def _variant(name: str):
    if name not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {name!r}; known: {', '.join(TINY_VARIANTS)}")
    return TINY_VARIANTS[name]


def tiny_text_encoder(projection: bool = False, **overrides):
    """CLIPTextModel sized to tiny_tokenizer's vocabulary, hidden 32 (= tiny_unet's
    cross_attention_dim), 2 layers; projection=True: CLIPTextModelWithProjection (SDXL's second
    encoder, whose `text_embeds` are the pooled embedding), projection_dim 32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, _ = _vocab_and_merges()
    config = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],  # pooling takes the hidden state at this id
        pad_token_id=vocab[EOS_TOKEN],
    )
    config.update(overrides)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def tiny_tokenizer(folder: Optional[str] = None):
    """A CLIPTokenizer over CAPTION_WORDS, built locally. With `folder`, vocab.json and merges.txt
    are written there and the tokenizer is loaded from them (the layout a pretrained CLIP tokenizer
    folder has), so the folder can be passed wherever a tokenizer path is expected."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    special = dict(unk_token=EOS_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                   model_max_length=MAX_LENGTH)
    if folder is None:
        return CLIPTokenizer(vocab=vocab, merges=merges, **special)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{left} {right}\n" for left, right in merges)
    return CLIPTokenizer.from_pretrained(folder, **special)


def tiny_scheduler(kind: str = "ddpm", num_train_timesteps: int = 1000):
    """The training noise schedule (linear betas 1e-4 .. 0.02, as DDPM in pixel space), as a
    DDPMScheduler or (kind="ddim") a DDIMScheduler with the same betas."""
    from diffusers import DDIMScheduler, DDPMScheduler

    schedulers = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in schedulers:
        raise ValueError(f"kind must be one of {sorted(schedulers)}, got {kind!r}")
    return schedulers[kind](num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
                            beta_end=0.02, clip_sample=False)


def tiny_vae(**overrides):
    """AutoencoderKL with a 4-channel latent at half the image size (one downsampling)."""
    from diffusers import AutoencoderKL

    config = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=8, sample_size=32)
    config.update(overrides)
    return AutoencoderKL(**config)


def _vocab_and_merges(words: Iterable[str] = CAPTION_WORDS):
    """CLIP's BPE layout: a token per base character, the same with the end-of-word mark "</w>",
    then merges that glue each word together left to right, and the two special tokens.

    BPE applies the lowest-ranked merge first, so one word's merge can split another ("re" of "red"
    inside "green"). Words that do not come out whole are moved to the front and the merges rebuilt,
    a few rounds, so every caption word is one token."""
    order = sorted(dict.fromkeys(words), key=len, reverse=True)
    for _ in range(10):
        vocab, merges = _build_bpe(order)
        ranks = {pair: i for i, pair in enumerate(merges)}
        split = [w for w in order if len(_bpe(w, ranks)) > 1]
        if not split:
            break
        order = split + [w for w in order if w not in split]
    return vocab, merges


def _build_bpe(words):
    vocab: dict = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for ch in BASE_CHARACTERS:
        add(ch)
    for ch in BASE_CHARACTERS:
        add(ch + "</w>")
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            if current not in vocab:
                merges.append(pair)
                add(current)
    add(BOS_TOKEN)
    add(EOS_TOKEN)
    return vocab, merges


def _bpe(word: str, ranks: dict) -> list:
    """The pieces CLIP's BPE makes of one word: merge the lowest-ranked adjacent pair until none is left."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, float("inf")), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces
