"""What the tests share, one of each: where things are (:mod:`tests.support.paths`),
doubles of libvirt domains, connections and guest agents (:mod:`tests.support.fakes`),
domain XML documents (:mod:`tests.support.domains`) and hand-built BTF blobs
(:mod:`tests.support.btf`)."""
