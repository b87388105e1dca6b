"""On-disk formats of a region image, read and written without root or loop devices:
``pfn`` (the NVDIMM PFN info block that makes a label-less NVDIMM an fsdax device) and
``erofs`` (a small reader of uncompressed EROFS images)."""
