"""x86_64 boot: guest layout, kernel loaders, boot structures (zero page, PVH start info, MP table,
GDT, page tables) and per-vCPU boot state.  ``x86.configure_system`` / ``x86.configure_vcpu``
are the entry points; the rest are pure builders tested on their own."""
