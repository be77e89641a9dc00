"""Per-platform initial CPU state and boot structures (x86 page tables, GDT, trampolines)."""
