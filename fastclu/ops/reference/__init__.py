"""Pure-PyTorch reference backend: the specification every kernel is tested against."""
