"""Legacy PC devices on the port-I/O bus: 8250 UART, i8042, debug port, CMOS, PCI config (absent bus)."""
