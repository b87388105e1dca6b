"""libshare: one canonical copy of shared files per trust group of libvirt guests.

The package's identity: its version and the XML namespace of the records it keeps in
libvirt domain ``<metadata>`` (read by ``domxml.metadata`` and, without parsing, by the
hook's shim). The subsystems live in sub-packages: ``domxml`` (pure domain-XML
transforms), ``virt`` (the only door to the libvirt API), ``hook`` (libvirt's qemu hook),
``sharing`` (store and region images), ``introspect`` (reading guests from the host),
``redirect`` (guest files onto the region), ``cli`` (the command line), ``demo`` (the
demo and its guest kit), ``util`` and ``data`` (shipped files).
"""

__version__ = "0.1.0"
#: namespace of libshare's enrolment record in a domain's ``<metadata>``
XMLNS = "https://libshare.dev/xmlns/domain/1"
