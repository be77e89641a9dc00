/*
 * 32-bit PVH entry of the hello kernel: switch to long mode, call kmain().
 *
 * The loader enters pvh_start (named by the XEN_ELFNOTE_PHYS32_ENTRY note below)
 * in 32-bit protected mode with paging off and flat segments (the Xen PVH boot ABI,
 * xen/include/public/arch-x86/hvm/start_info.h).  We identity-map the first GiB
 * with 2 MiB pages, enable PAE + long mode + paging, load a 64-bit GDT and jump
 * to 64-bit code.  The page tables are filled here, so nothing assumes the loader
 * zeroed .bss.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)
#define CR4_PAE (1 << 5)
#define CR0_PE_PG 0x80000001
#define PTE_P_RW 0x003
#define PDE_P_RW_PS 0x083

	.section .note.Xen, "a", @note
	.balign 4
	.long 2f - 1f			/* namesz */
	.long 4f - 3f			/* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY	/* type */
1:	.asciz "Xen"
2:	.balign 4
3:	.long pvh_start			/* 32-bit physical entry point */
4:	.balign 4

	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	cld
	movl	$boot_stack_top, %esp

	/* Zero the three page-table pages (PML4, PDPT, PD). */
	movl	$pml4, %edi
	xorl	%eax, %eax
	movl	$(3 * 4096 / 4), %ecx
	rep stosl

	movl	$pdpt + PTE_P_RW, pml4
	movl	$pd + PTE_P_RW, pdpt
	movl	$pd, %edi
	movl	$PDE_P_RW_PS, %eax
	movl	$512, %ecx
1:	movl	%eax, (%edi)
	addl	$0x200000, %eax
	addl	$8, %edi
	loop	1b

	movl	%cr4, %eax
	orl	$CR4_PAE, %eax
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$MSR_EFER, %ecx
	rdmsr
	orl	$EFER_LME, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$CR0_PE_PG, %eax
	movl	%eax, %cr0

	lgdt	gdt_descriptor
	ljmp	$0x08, $long_mode

	.code64
long_mode:
	movw	$0x10, %ax
	movw	%ax, %ds
	movw	%ax, %es
	movw	%ax, %ss
	xorw	%ax, %ax
	movw	%ax, %fs
	movw	%ax, %gs
	movq	$boot_stack_top, %rsp
	call	kmain
2:	hlt
	jmp	2b

	.section .rodata
	.balign 8
gdt:
	.quad 0				/* null */
	.quad 0x00af9a000000ffff	/* 0x08: 64-bit code, DPL 0 */
	.quad 0x00cf92000000ffff	/* 0x10: data, DPL 0 */
gdt_end:
gdt_descriptor:
	.word gdt_end - gdt - 1
	.long gdt

	.section .bss
	.balign 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4096
	.balign 16
	.skip 16384
boot_stack_top:

	.section .note.GNU-stack, "", @progbits	/* no executable stack */
