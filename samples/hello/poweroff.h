/*
 * Power the VM off from bare metal, the way firmware's ACPI code would on QEMU's q35 machine.
 *
 * Without firmware nobody has enabled the chipset's ACPI power-management I/O block, so the
 * kernel does it: give the ICH9 LPC bridge (PCI 00:1f.0) an I/O base for it (PMBASE, config
 * register 0x40), switch it on (ACPI_CNTL bit 7, register 0x44), then write SLP_EN with sleep
 * type 0 to PM1a_CNT (PMBASE + 4): QEMU treats that as a soft power-off and exits with status 0.
 * Under a firmware that already did this (SeaBIOS, OVMF use base 0x600 too) it changes nothing.
 */
#ifndef HELLO_POWEROFF_H
#define HELLO_POWEROFF_H

#include "serial.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define ICH9_LPC_BDF ((0u << 16) | (0x1fu << 11) | (0u << 8))	/* bus 0, device 31, function 0 */
#define ICH9_LPC_VENDOR_DEVICE 0x29188086u			/* Intel 82801IB (ICH9) LPC */
#define ICH9_LPC_PMBASE 0x40
#define ICH9_LPC_ACPI_CNTL 0x44
#define ICH9_LPC_ACPI_EN 0x80
#define PM_BASE 0x600
#define PM1_CNT 4
#define PM1_CNT_SLP_EN 0x2000	/* sleep enable; sleep type (bits 10-12) 0 = soft off */

static inline void outw(unsigned short port, unsigned short value)
{
	__asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(unsigned short port, unsigned int value)
{
	__asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned int inl(unsigned short port)
{
	unsigned int value;

	__asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline unsigned int lpc_config_read(unsigned int reg)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | ICH9_LPC_BDF | reg);
	return inl(PCI_CONFIG_DATA);
}

static inline void lpc_config_write(unsigned int reg, unsigned int value)
{
	outl(PCI_CONFIG_ADDRESS, 0x80000000u | ICH9_LPC_BDF | reg);
	outl(PCI_CONFIG_DATA, value);
}

/*
 * Returns 0 when the machine has no ICH9 LPC bridge (not a q35), 1 once the request is written.
 * QEMU acts on it asynchronously: the CPU runs on for a moment, so halt after it.
 */
static inline int poweroff(void)
{
	if (lpc_config_read(0) != ICH9_LPC_VENDOR_DEVICE)
		return 0;
	lpc_config_write(ICH9_LPC_PMBASE, PM_BASE | 1);	/* bit 0 reads as 1: I/O space */
	lpc_config_write(ICH9_LPC_ACPI_CNTL, lpc_config_read(ICH9_LPC_ACPI_CNTL) | ICH9_LPC_ACPI_EN);
	outw(PM_BASE + PM1_CNT, PM1_CNT_SLP_EN);
	return 1;
}

#endif
