"""Optional bridges to other libraries (pyarrow, awkward), each imported lazily inside its module."""
