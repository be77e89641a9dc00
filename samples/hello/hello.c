/* The hello kernel: write a greeting to COM1 and halt.  Freestanding, no libc. */
#include "serial.h"

static const char greeting[] = "Hello from an IGVM-launched kernel!\r\n";

void kmain(void);

void kmain(void)
{
	serial_init();
	for (const char *p = greeting; *p; p++)
		serial_putc(*p);
	for (;;)
		__asm__ volatile("cli; hlt");
}
