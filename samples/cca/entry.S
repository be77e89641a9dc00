/*
 * A tiny arm64 "kernel" for an Arm CCA realm, in the arm64 Linux Image format
 * (Documentation/arch/arm64/booting.rst): the loader enters at the Image's first byte with
 * x0 = the device tree's address, the MMU off.  It checks the device tree's magic, counts
 * the ticks of the generic timer for a while and powers the realm off with PSCI SYSTEM_OFF
 * over SMC (a realm's PSCI conduit; the RMM hands the call to the host), or, when the DTB is
 * bad, with SYSTEM_RESET.
 */
	.section .head, "ax"
	.globl	_start
_start:
	b	primary			/* code0: branch to the code */
	.long	0			/* code1 */
	.quad	0			/* text_offset: load at the 2 MiB-aligned base */
	.quad	_image_size		/* image_size: from the linker script (BSS included) */
	.quad	0xa			/* flags: little endian, 4K pages, anywhere in RAM */
	.quad	0, 0, 0			/* res2..res4 */
	.ascii	"ARM\x64"		/* magic */
	.long	0			/* res5 (no PE header) */

	.text
primary:
	mov	x19, x0			/* the DTB */
	adr	x1, stack_top
	mov	sp, x1
	ldr	w2, [x19]		/* fdt_header.magic, big endian */
	rev	w2, w2
	movz	w3, #0xfeed
	movk	w3, #0xd00d, lsl #16
	cmp	w2, w3
	b.ne	bad_dtb
	adr	x4, dtb_seen
	str	x19, [x4]
	mrs	x5, cntvct_el0		/* wait a little: 2^20 timer ticks */
1:	mrs	x6, cntvct_el0
	sub	x6, x6, x5
	cmp	x6, #(1 << 20)
	b.lo	1b
	movz	w0, #0x0008		/* PSCI_0_2_FN_SYSTEM_OFF = 0x84000008 */
	movk	w0, #0x8400, lsl #16
	smc	#0
	b	hang
bad_dtb:
	movz	w0, #0x0009		/* PSCI_0_2_FN_SYSTEM_RESET = 0x84000009 */
	movk	w0, #0x8400, lsl #16
	smc	#0
hang:
	wfi
	b	hang

	.bss
	.balign	16
dtb_seen:
	.quad	0
	.balign	16
stack:
	.skip	4096
stack_top:
