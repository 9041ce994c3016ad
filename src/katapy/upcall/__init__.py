"""The upcall protocol: the VMM asks the guest to take a hot-plugged resource into use.

Wire format of Kata's dbs-upcall device manager (docs/protocols.md §"upcall"),
shared by the VMM's client (``katapy.vmm.upcall``) and the guest's server
(``katapy.agent.upcall``).  This package is in the guest image, so it imports
nothing but the standard library.
"""
