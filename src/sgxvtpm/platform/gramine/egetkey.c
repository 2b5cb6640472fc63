/* libsgxvtpm_egetkey.so: EGETKEY for a Gramine enclave (sgxvtpm, platform/gramine/egetkey.py).
 *
 * The one thing /dev/attestation does not give: a key for an arbitrary
 * KEYREQUEST (the REPORT key for local attestation, SEAL keys of an older
 * ISVSVN or CPUSVN). ENCLU[EGETKEY] is an enclave-mode instruction; inside a
 * Gramine enclave the application may execute it. Written from the Intel SDM
 * vol. 3D, 38.18 (KEYREQUEST) and 40 (EGETKEY: RAX = 1, RBX = KEYREQUEST,
 * 512-byte aligned; RCX = output key, 16-byte aligned; RAX = 0 or an error).
 *
 * Build (on the SGX host, listed in sgx.trusted_files so it is measured):
 *   cc -O2 -shared -fPIC -o libsgxvtpm_egetkey.so egetkey.c
 * Outside an enclave the instruction faults (SIGILL/SIGSEGV): never call it there.
 */
#include <stdint.h>
#include <string.h>

#define ENCLU_EGETKEY 1

int sgxvtpm_egetkey(const uint8_t request[512], uint8_t key[16]) {
    static __thread uint8_t req[512] __attribute__((aligned(512)));
    static __thread uint8_t out[16] __attribute__((aligned(16)));
    uint64_t rax = ENCLU_EGETKEY;
    memcpy(req, request, sizeof(req));
    __asm__ volatile(".byte 0x0f, 0x01, 0xd7" /* ENCLU */
                     : "+a"(rax)
                     : "b"(req), "c"(out)
                     : "memory", "cc");
    if (rax == 0)
        memcpy(key, out, sizeof(out));
    memset(out, 0, sizeof(out));
    return (int)rax;
}
