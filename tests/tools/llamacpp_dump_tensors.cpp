// Run one llama_decode of a token sequence on llama.cpp's CPU backend and write every contiguous F32 tensor of
// the compute graph (the first tensor of each name) to OUTDIR/<name>__<ne0>x<ne1>x<ne2>.f32, plus the logits.
// Used by tests/test_gguf_activations.py to check quantkit.gguf.activations against llama.cpp's own matmuls.
// Build: c++ -O2 -std=c++17 this.cpp -I<llama.cpp>/include -I<llama.cpp>/ggml/include <static libs> -fopenmp
// Usage: llamacpp_dump_tensors MODEL.gguf TOKENS.i32 OUTDIR   (tokens: little-endian int32, BOS included)
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <cstdio>
#include <set>
#include <string>
#include <vector>

static std::string g_outdir;
static std::set<std::string> g_seen;

static bool dump_tensor(struct ggml_tensor * t, bool ask, void *) {
    if (ask) {
        return true;  // observe every node
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t) || !g_seen.insert(t->name).second) {
        return true;
    }
    std::string name = t->name;
    for (auto & c : name) {
        if (c == '/' || c == ' ' || c == '(' || c == ')') {
            c = '_';
        }
    }
    std::vector<float> buf(ggml_nelements(t));
    ggml_backend_tensor_get(t, buf.data(), 0, ggml_nbytes(t));
    const std::string path = g_outdir + "/" + name + "__" + std::to_string(t->ne[0]) + "x" + std::to_string(t->ne[1]) +
                             "x" + std::to_string(t->ne[2]) + ".f32";
    FILE * f = fopen(path.c_str(), "wb");
    if (f == nullptr || fwrite(buf.data(), sizeof(float), buf.size(), f) != buf.size()) {
        fprintf(stderr, "cannot write %s\n", path.c_str());
        return false;
    }
    fclose(f);
    return true;
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.i32 OUTDIR\n", argv[0]);
        return 2;
    }
    g_outdir = argv[3];
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == nullptr) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    std::vector<llama_token> tokens(1 << 16);
    FILE * f = fopen(argv[2], "rb");
    if (f == nullptr) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    tokens.resize(fread(tokens.data(), sizeof(llama_token), tokens.size(), f));
    fclose(f);
    const int n = (int) tokens.size();

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n;
    cp.n_batch = n;
    cp.n_ubatch = n;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.type_k = GGML_TYPE_F32;  // as the llama-perplexity comparison: F32 KV cache, no flash attention
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.cb_eval = dump_tensor;
    cp.cb_eval_user_data = nullptr;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    const size_t n_vocab = (size_t) llama_vocab_n_tokens(llama_model_get_vocab(model));
    FILE * out = fopen((g_outdir + "/logits.f32").c_str(), "wb");
    fwrite(llama_get_logits(ctx), sizeof(float), (size_t) n * n_vocab, out);
    fclose(out);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
