"""kernel_report's token-loop instruction count, on a hand-written PTX fragment."""


from sglang_sawint4.bench import kernel_report

PTX = """
	mov.b32 	%r1, 0;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	.loc	1 120 33                        // decode.py:120:33
	ld.shared.b8 	%rs1, [%r2];
	ld.shared.b8 	%rs2, [%r2+64];
	.loc	2 179 83                        // format_jit.py:179:83 @[ decode.py:140:53 ]
	// begin inline asm
	{
	.reg .b32 z;
	prmt.b32 	%r3, %r4, %r5, 16704;
	}
	// end inline asm
	@%p7 bra 	$L__BB0_9;
$L__BB0_9:
	@!%p3 mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 	{%f1}, {%r1}, {%r2}, {%f1};
	setp.lt.s32 	%p42, %r9, %r10;
	@%p42 bra 	$L__BB0_2;
	ret;
"""


def test_token_loop_counts_instructions_by_opcode_and_source_line():
    loop = kernel_report.token_loop(PTX)
    assert "Inner Loop Header" in loop[0] and loop[-1].strip() == "@%p42 bra \t$L__BB0_2;"
    opcodes, sources = kernel_report.instructions_by_source(loop)
    assert opcodes == {"ld.shared.b8": 2, "prmt.b32": 1, "bra": 2,
                       "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32": 1, "setp.lt.s32": 1}
    assert sources == {"decode.py:120:33": 2, "format_jit.py:179:83 @[ decode.py:140:53 ]": 5}


# LLVM may lay a loop out latch first: the latch block branches forward to the header, and
# the body's back branches go to the latch (seen with a region inside Triton's loop).
PTX_LATCH_FIRST = """
	mov.b32 	%r1, 0;
	bra.uni 	$L__BB0_2;
$L__BB0_4:                              //   in Loop: Header=BB0_2 Depth=1
	add.s32 	%r1, %r1, 1;
	@%p16 bra 	$L__BB0_2;
	bra.uni 	$L__BB0_5;
$L__BB0_2:                              // %__nv_exp2f.exit
	ld.shared.b32 	%r2, [%r3];
	@%p9 bra 	$L__BB0_4;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 	{%f1}, {%r1}, {%r2}, {%f1};
	bra.uni 	$L__BB0_4;
$L__BB0_5:
	ret;
"""


def test_token_loop_spans_a_latch_laid_out_before_the_header():
    loop = kernel_report.token_loop(PTX_LATCH_FIRST)
    assert loop[0].startswith("$L__BB0_4:") and loop[-1].strip() == "bra.uni \t$L__BB0_4;"
    opcodes, _ = kernel_report.instructions_by_source(loop)
    assert opcodes == {"add.s32": 1, "bra": 2, "bra.uni": 2, "ld.shared.b32": 1,
                       "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32": 1}
