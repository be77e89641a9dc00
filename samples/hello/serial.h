/* Polled 16550 UART on COM1 (I/O port 0x3f8): just enough to print a line. */
#ifndef HELLO_SERIAL_H
#define HELLO_SERIAL_H

#define COM1 0x3f8
#define UART_LSR 5		/* line status register */
#define UART_LSR_THRE 0x20	/* transmit holding register empty */

static inline void outb(unsigned short port, unsigned char value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
	unsigned char value;

	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB on */
	outb(COM1 + 0, 0x01);	/* divisor 1: 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1, DLAB off */
	outb(COM1 + 2, 0xc7);	/* FIFO on, cleared */
}

static inline void serial_putc(char c)
{
	for (unsigned int spins = 0; spins < 100000; spins++)
		if (inb(COM1 + UART_LSR) & UART_LSR_THRE)
			break;
	outb(COM1, (unsigned char)c);
}

#endif
