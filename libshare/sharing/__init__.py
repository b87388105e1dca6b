"""The sharing engine: canonical library store and DAX-capable region images.

Modules:

* :mod:`libshare.sharing.elf` -- identity of one candidate file (x86-64 ELF check,
  build-id, SONAME, PT_LOAD segments, SHA-256, size) or the reason it is skipped;
* :mod:`libshare.sharing.store` -- content-addressed store of library objects and its
  index (build-id -> hashes, soname, guest paths);
* :mod:`libshare.sharing.formats.pfn` -- the NVDIMM PFN info block (``struct nd_pfn_sb``) that
  makes a label-less guest NVDIMM an fsdax device;
* :mod:`libshare.sharing.formats.erofs` -- a small read-only reader of uncompressed EROFS images
  (used to verify region contents without root or loop devices);
* :mod:`libshare.sharing.region.build` -- deterministic region images (PFN block + EROFS),
  per-group links, verify, ls and gc.
"""
