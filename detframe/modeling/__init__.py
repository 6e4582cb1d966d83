"""detframe's models: backbones, proposal generators, ROI heads and meta-architectures."""
