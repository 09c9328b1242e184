"""The op library: the public functions and loss modules, the plain-PyTorch reference, the
custom-op registration, backend selection and the native library loader."""
