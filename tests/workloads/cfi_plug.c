/* libcfi_plug_a.so / libcfi_plug_b.so: plug(cb) calls cb from a frame of PLUG_FRAME bytes.  The
 * two builds have the same code layout, so the return address into plug is at the same offset
 * while the frame size behind it differs: after dlclose of one and dlopen of the other at the
 * same address, a rule learnt for the first reads the second's stack wrongly (test_unwind_reload). */
#ifndef PLUG_FRAME
#error PLUG_FRAME
#endif
#define STR_(x) #x
#define STR(x) STR_(x)

__asm__(".text\n"
        ".globl plug\n"
        ".type plug,@function\n"
        "plug:\n"
        ".cfi_startproc\n"
        "sub $" STR(PLUG_FRAME) ", %rsp\n"
        ".cfi_def_cfa_offset " STR(PLUG_FRAME) " + 8\n"
        "call *%rdi\n"
        "add $" STR(PLUG_FRAME) ", %rsp\n"
        ".cfi_def_cfa_offset 8\n"
        "ret\n"
        ".cfi_endproc\n"
        ".size plug, .-plug\n");
