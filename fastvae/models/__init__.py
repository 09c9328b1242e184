"""The VAE built on the ops: ``VAE``, ``build_vae`` and the encoder/decoder builders."""
