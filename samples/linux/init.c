/*
 * /init of the linux sample's initrd: print a marker line on the console, then power the VM off.
 *
 * Static and freestanding (raw x86-64 Linux system calls, no libc), so the toolchain `./dev`
 * installs builds it and the initrd needs nothing else: no shell, no loader, no libraries.
 *
 * Power-off: with ACPI (the kernel was started by firmware, e.g. OVMF) reboot(POWER_OFF) does
 * it.  A kernel booted directly from an IGVM file has no ACPI tables, so the kernel cannot power
 * off (it would only halt); /init then asks QEMU's q35 chipset itself, as ACPI firmware would:
 * it enables the ICH9 power-management I/O block and writes a soft-off request (see
 * samples/hello/poweroff.h for the registers).  Either way QEMU exits with status 0.
 */

#define SYS_write 1
#define SYS_open 2
#define SYS_access 21
#define SYS_exit 60
#define SYS_mkdir 83
#define SYS_sync 162
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_iopl 172

#define O_WRONLY 01
#define O_NOCTTY 0400
#define F_OK 0
#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcL

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define ICH9_LPC 0x8000f800u		/* enable bit, bus 0, device 31, function 0 */
#define ICH9_LPC_VENDOR_DEVICE 0x29188086u
#define ICH9_LPC_PMBASE 0x40
#define ICH9_LPC_ACPI_CNTL 0x44
#define ICH9_LPC_ACPI_EN 0x80
#define PM_BASE 0x600
#define PM1_CNT_SLP_EN 0x2000

/* The line the boot tests wait for (tests/test_boot.py). */
static const char marker[] = "igvm-builder linux sample: /init reached\n";

static long syscall5(long n, long a, long b, long c, long d, long e)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

static unsigned long length(const char *s)
{
	unsigned long n = 0;

	while (s[n])
		n++;
	return n;
}

static void say(long fd, const char *s)
{
	syscall5(SYS_write, fd, (long)s, (long)length(s), 0, 0);
}

static void outw(unsigned short port, unsigned short value)
{
	__asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static void outl(unsigned short port, unsigned int value)
{
	__asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static unsigned int inl(unsigned short port)
{
	unsigned int value;

	__asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static unsigned int lpc_read(unsigned int reg)
{
	outl(PCI_CONFIG_ADDRESS, ICH9_LPC | reg);
	return inl(PCI_CONFIG_DATA);
}

static void lpc_write(unsigned int reg, unsigned int value)
{
	outl(PCI_CONFIG_ADDRESS, ICH9_LPC | reg);
	outl(PCI_CONFIG_DATA, value);
}

/* Without ACPI: the q35 soft-off request.  Returns if this is not a q35 or ports are denied. */
static void chipset_poweroff(long console)
{
	if (syscall5(SYS_iopl, 3, 0, 0, 0, 0) != 0) {
		say(console, "init: iopl(3) refused: cannot reach the chipset\n");
		return;
	}
	if (lpc_read(0) != ICH9_LPC_VENDOR_DEVICE) {
		say(console, "init: not a q35 machine (no ICH9 LPC bridge)\n");
		return;
	}
	lpc_write(ICH9_LPC_PMBASE, PM_BASE | 1);
	lpc_write(ICH9_LPC_ACPI_CNTL, lpc_read(ICH9_LPC_ACPI_CNTL) | ICH9_LPC_ACPI_EN);
	outw(PM_BASE + 4, PM1_CNT_SLP_EN);
	for (;;)
		syscall5(SYS_sync, 0, 0, 0, 0, 0);	/* QEMU stops the VM in a moment */
}

void init_main(void);

void init_main(void)
{
	long console = syscall5(SYS_open, (long)"/dev/console", O_WRONLY | O_NOCTTY, 0, 0, 0);

	if (console < 0)
		console = 1;	/* the kernel's own /dev/console, if it opened one */
	say(console, marker);
	syscall5(SYS_sync, 0, 0, 0, 0, 0);

	syscall5(SYS_mkdir, (long)"/sys", 0755, 0, 0, 0);
	syscall5(SYS_mount, (long)"sysfs", (long)"/sys", (long)"sysfs", 0, 0);
	if (syscall5(SYS_access, (long)"/sys/firmware/acpi", F_OK, 0, 0, 0) == 0) {
		say(console, "init: powering off through ACPI\n");
	} else {
		say(console, "init: no ACPI tables (no firmware): powering off through the q35 chipset\n");
		chipset_poweroff(console);
	}
	/* With ACPI this powers off; without it the kernel can only halt. */
	syscall5(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0, 0);
	say(console, "init: reboot(POWER_OFF) failed\n");
	syscall5(SYS_exit, 1, 0, 0, 0, 0);	/* the kernel panics: init exited */
}

/* The process entry: align the stack for the C ABI and call init_main(). */
__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	xorl %ebp, %ebp\n"
	"	andq $-16, %rsp\n"
	"	call init_main\n"
	"	hlt\n");
