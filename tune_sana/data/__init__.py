"""Data as trials read it: encoded tensors (``encoded``), the built-in demo world, image folders
and manifests (``images``), the encoding cache built once per dataset with the checkpoint's
AutoencoderDC and Gemma-2 (``cache``), and checkpoint files on disk (``checkpoints``).

May import: config, outcomes, device, torch, diffusers/transformers (the encoders).
Never imports: Ray, training, engine, record, analysis.
"""
