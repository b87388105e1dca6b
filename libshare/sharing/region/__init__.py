"""Region images: one deterministic file per trust group, holding the canonical copies.

``layout`` (what an image is: PFN head, EROFS, names and paths under the regions
directory), ``manifest`` (the JSON and TSV manifests inside), ``build`` (store objects
to a published image), ``verify`` (checking an image) and ``gc`` (the images on this
host, which ones are in use, removing the rest).
"""
