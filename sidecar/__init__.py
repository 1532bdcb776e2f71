"""kforge-sidecar: receiver → spool → uploader → wandb, beside the trainer."""
