/* The hello kernel: write a greeting to COM1, then power the VM off.  Freestanding, no libc. */
#include "poweroff.h"
#include "serial.h"

static const char greeting[] = "Hello from an IGVM-launched kernel!\r\n";
static const char no_q35[] = "hello: not a q35 machine (no ICH9 power-off port); halting\r\n";

void kmain(void);

static void serial_puts(const char *s)
{
	for (; *s; s++)
		serial_putc(*s);
}

void kmain(void)
{
	serial_init();
	serial_puts(greeting);
	if (!poweroff())
		serial_puts(no_q35);
	for (;;)
		__asm__ volatile("cli; hlt");
}
