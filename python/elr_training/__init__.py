"""Library of the training application python/train.py (DESIGN.md 7).

config       one dataclass per stage, argparse and YAML
data/        synthetic scenes, the three on-disk formats, condition maps and condition dropout
models       loading the tiny built-in configuration or a local Stable Diffusion folder
stages       stage 0 (teacher), 1 (low-rank distillation), 2 (control adapter): their losses
checkpoint   atomic safetensors checkpoints and --resume
logging      TensorBoard, loss-curve PNG, metrics.json
metrics      edge NMSE and segmentation IoU (shared with evaluate.py)
"""
