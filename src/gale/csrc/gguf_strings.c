// A GGUF string array (a vocabulary, its merges: ~100k strings) in one pass, for gale.weights.gguf.
// Python reading them one by one took 17 ms per 49k; here their bytes are packed into one buffer that Python
// decodes once and splits.
#include <stdint.h>
#include <string.h>

// `count` strings of GGUF's layout (a little-endian uint64 length, then that many bytes) from src, which holds
// `avail` bytes. With dst NULL only measures; otherwise writes the strings into dst, each followed by a '\0'
// (the caller splits on it and checks that no string held one). Returns the bytes the array spans in src, or
// -1 when it runs past `avail`. Example: src = [2,0,0,0,0,0,0,0,'h','i', 0,0,0,0,0,0,0,0] with count 2 spans
// 18 bytes and writes "hi\0\0".
int64_t gale_gguf_strings(const uint8_t *src, int64_t avail, int64_t count, uint8_t *dst) {
    int64_t pos = 0;
    for (int64_t i = 0; i < count; i++) {
        uint64_t n;
        if (avail - pos < 8)
            return -1;
        memcpy(&n, src + pos, 8);
        pos += 8;
        if (n > (uint64_t)(avail - pos))
            return -1;
        if (dst) {
            memcpy(dst, src + pos, n);
            dst[n] = 0;
            dst += n + 1;
        }
        pos += (int64_t)n;
    }
    return pos;
}
