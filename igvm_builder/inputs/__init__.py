"""Input readers: ELF kernels, Linux bzImages, UKIs, OVMF firmware images and raw blobs.

Every reader takes ``bytes`` (or a ``memoryview``) plus a ``name`` used in error messages,
and returns frozen dataclasses; none of them touches the filesystem.
"""
