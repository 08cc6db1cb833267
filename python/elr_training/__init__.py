"""Library of the training application python/train.py; python/README.md shows how the pieces fit.

config       one dataclass per stage, presets, argparse and YAML
data/        synthetic scenes, the on-disk formats, condition maps and condition dropout
models       the model parts: the tiny built-in configuration or local model folders, loaded and saved
losses       the diffusion objective's pieces (noising, w(lambda_t), weighted MSE, caption dropout)
stages/      the Stage interface and stage 0 (teacher), 1 (low-rank distillation), 2 (control adapter)
loop         the training loop every stage runs through, and its resumable position
checkpoint   atomic safetensors checkpoints and --resume-from-checkpoint
run_folder   what a run leaves behind: written and read back (evaluate.py)
run_log      TensorBoard, loss-curve PNG, JSON, the environment the numbers depend on
sampling     generation with ELRControlPipeline, uint8 conversions, the image grid
metrics      the paper's metrics: edge NMSE and F-score, IoU, FID, CLIP score, the control verdict
evaluation   samples, generation per condition type and every metric over them; Tables 1 to 3
cli          one-line errors for the scripts
"""
