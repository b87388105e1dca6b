"""The sharing engine: canonical file store and DAX-capable region images.

* :mod:`libshare.sharing.elf` -- identity of one candidate file (x86-64 ELF check,
  build-id, SONAME, PT_LOAD segments, SHA-256, size) or the reason it is skipped;
* :mod:`libshare.sharing.store` -- content-addressed store of objects and its index
  (build-id -> hashes, soname, guest paths);
* :mod:`libshare.sharing.accounting` -- host memory attributed to guests (smaps per
  mapping, page cache counted once);
* :mod:`libshare.sharing.formats` -- the PFN info block and the EROFS reader;
* :mod:`libshare.sharing.region` -- region images: layout, manifest, build, verify, gc.
"""
