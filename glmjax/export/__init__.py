"""Export of glmjax checkpoints to Hugging Face / PyTorch (DESIGN.md §7)."""
