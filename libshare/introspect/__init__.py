"""Introspection: see inside running guests from the host, with no change to the guest.

Owns nothing itself; its modules, lowest layer first:

- :mod:`~libshare.introspect.memory`: guest physical memory readers (``/proc/PID/mem``,
  file/memfd, bytes) behind one interface, with a bounded page cache;
- :mod:`~libshare.introspect.qemu`: a libvirt domain's QEMU process and RAM layout,
  bounded pause/resume;
- :mod:`~libshare.introspect.vmi`: the optional LibVMI reader (cross-checks);
- :mod:`~libshare.introspect.paging`: x86-64 page tables (4/5 levels, huge pages, PTI);
- :mod:`~libshare.introspect.btf` and :mod:`~libshare.introspect.layout`: structure
  layouts from the kernel's BTF (or an ISF JSON / offsets file);
- :mod:`~libshare.introspect.discover`: finding the kernel (init_task, KASLR, page
  tables) and :mod:`~libshare.introspect.kernel`: reading kernel virtual memory;
- :mod:`~libshare.introspect.cache`: what discovery found, per boot and per BTF blob;
- :mod:`~libshare.introspect.session`: one look at a running domain's kernel;
- :mod:`~libshare.introspect.helpers`: drgn-style walkers (lists, tasks, VMAs, maple
  tree, d_path, resident pages, build-ids);
- :mod:`~libshare.introspect.survey`: the library survey behind ``libshare survey``;
- :mod:`~libshare.introspect.pagecache`: the files in a guest's page cache
  (superblocks, inodes, nrpages), for ``libshare survey --page-cache``.
"""
