"""The Zarr teacher cache (README 'The cache format'): format, writer primitives, reader, info and verify."""

from cot2align.cache.reader import TeacherCache, gather_embeddings, open_cache
from cot2align.cache.format import CacheError

__all__ = ["CacheError", "TeacherCache", "gather_embeddings", "open_cache"]
