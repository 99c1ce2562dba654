/* A qemu-user TCG plugin that counts the guest instructions a program executes and prints the total
 * when it exits (to stderr, as "insns: N"). scripts/bench-aarch64-insn.sh uses it as the proxy for a
 * Pi's speed that can be measured on x86-64: instructions per generated token, shoal against llama.cpp,
 * both built for aarch64 and run under qemu-aarch64.
 *
 * Counting is an inline add per translation block (its instruction count), no callback per
 * instruction, so a run costs little more than plain emulation. One counter for all threads: run
 * the programs single-threaded for exact figures. */
#include <inttypes.h>
#include <stdio.h>
#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t insns;

static void on_tb_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &insns,
                                             qemu_plugin_tb_n_insns(tb));
}

static void on_exit(qemu_plugin_id_t id, void *data)
{
    (void)id;
    (void)data;
    char line[64];
    snprintf(line, sizeof line, "insns: %" PRIu64 "\n", insns);
    qemu_plugin_outs(line);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc,
                                           char **argv)
{
    (void)info;
    (void)argc;
    (void)argv;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_tb_translate);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
