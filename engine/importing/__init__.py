"""Importing models users already hold (transformers / timm / torch-hub encoders, diffusers UNets, VAEs and
schedulers) into synthgen packs: `checkpoints` reads files safely, `encoders` and `diffusion` convert each
kind of source, `pack_import` validates the whole and writes the pack."""
