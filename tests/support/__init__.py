"""What the tests share, one of each: where things are (:mod:`tests.support.paths`),
doubles of libvirt domains, connections and guest agents (:mod:`tests.support.fakes`),
domain XML documents (:mod:`tests.support.domains`), hand-built BTF blobs
(:mod:`tests.support.btf`) and initrd files (:mod:`tests.support.initrds`)."""
