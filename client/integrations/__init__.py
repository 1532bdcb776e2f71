"""Adapters that put kforge-sidecar behind each framework's own logging plug-in.

One module per framework, each importing only its own framework, so that one
framework missing never hides another's adapter. Import the one you use:

    from client.integrations.lightning import SidecarLogger          # PyTorch Lightning
    from client.integrations.transformers import SidecarCallback     # HF Transformers Trainer
    from client.integrations.accelerate import SidecarTracker        # HF Accelerate

This package itself imports nothing: ``import client`` (and ``import
client.integrations``) never loads torch or any framework.
"""

__all__: list[str] = []
