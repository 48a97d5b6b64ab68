/*
 * predict.c: run an MXNet graph that contains mx_instnorm's compiled
 * operator from C, without Python (docs/deploy.md, "C and C++ without
 * Python"; tests/test_c_predict.py builds and runs it).
 *
 *   predict LIBRARY SYMBOL_JSON PARAMS INPUT OUTPUT DIM...
 *
 * LIBRARY is mx_instnorm.library_path() ("-" loads none), INPUT a file of
 * float32 values in C order for the input "data" of shape DIM...; the
 * first output is written to OUTPUT as float32 and its shape printed.
 * Exit status 0 on success, 1 with MXNet's message on stderr otherwise.
 *
 * Build: gcc predict.c -I<mxnet>/include -L<mxnet> -lmxnet -Wl,-rpath,<mxnet>
 */
#include <stdbool.h> /* c_predict_api.h uses bool and uint32_t without */
#include <stdint.h>  /* including these itself (it is mostly read as C++). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mxnet/c_predict_api.h>

/* c_api.h declares MXLoadLib too, but it is C++-only in places. */
int MXLoadLib(const char* path, unsigned verbose);

static void* read_file(const char* path, long* size) {
  FILE* f = fopen(path, "rb");
  if (f == NULL) {
    fprintf(stderr, "predict: cannot open %s\n", path);
    return NULL;
  }
  fseek(f, 0, SEEK_END);
  *size = ftell(f);
  fseek(f, 0, SEEK_SET);
  /* One byte more, zeroed: the graph JSON is read as a C string. */
  char* data = calloc((size_t)*size + 1, 1);
  if (data == NULL || fread(data, 1, (size_t)*size, f) != (size_t)*size) {
    fprintf(stderr, "predict: cannot read %s\n", path);
    free(data);
    data = NULL;
  }
  fclose(f);
  return data;
}

#define CHECK(call)                                                  \
  do {                                                               \
    if ((call) != 0) {                                               \
      fprintf(stderr, "predict: %s failed: %s\n", #call, MXGetLastError()); \
      return 1;                                                      \
    }                                                                \
  } while (0)

int main(int argc, char** argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: predict LIBRARY SYMBOL_JSON PARAMS INPUT OUTPUT DIM...\n");
    return 2;
  }
  const char* library = argv[1];
  mx_uint ndim = (mx_uint)(argc - 6);
  mx_uint shape[16];
  mx_uint indptr[2] = {0, ndim};
  size_t count = 1;
  if (ndim > 16) {
    fprintf(stderr, "predict: at most 16 dimensions\n");
    return 2;
  }
  for (mx_uint i = 0; i < ndim; ++i) {
    shape[i] = (mx_uint)strtoul(argv[6 + i], NULL, 10);
    count *= shape[i];
  }

  /* The operator must be registered before the graph naming it is read. */
  if (strcmp(library, "-") != 0) CHECK(MXLoadLib(library, 0));

  long json_size = 0, params_size = 0, input_size = 0;
  char* json = read_file(argv[2], &json_size);
  void* params = read_file(argv[3], &params_size);
  float* input = read_file(argv[4], &input_size);
  if (json == NULL || params == NULL || input == NULL) return 1;
  if ((size_t)input_size != count * sizeof(float)) {
    fprintf(stderr, "predict: %s holds %ld bytes, the shape needs %zu\n", argv[4],
            input_size, count * sizeof(float));
    return 1;
  }

  const char* keys[1] = {"data"};
  PredictorHandle predictor = NULL;
  CHECK(MXPredCreate(json, params, (int)params_size, 1 /* cpu */, 0, 1, keys, indptr,
                     shape, &predictor));
  CHECK(MXPredSetInput(predictor, "data", input, (mx_uint)count));
  CHECK(MXPredForward(predictor));

  mx_uint* out_shape = NULL;
  mx_uint out_ndim = 0;
  CHECK(MXPredGetOutputShape(predictor, 0, &out_shape, &out_ndim));
  size_t out_count = 1;
  printf("output shape:");
  for (mx_uint i = 0; i < out_ndim; ++i) {
    out_count *= out_shape[i];
    printf(" %u", out_shape[i]);
  }
  printf("\n");
  float* output = malloc(out_count * sizeof(float));
  if (output == NULL) return 1;
  CHECK(MXPredGetOutput(predictor, 0, output, (mx_uint)out_count));
  CHECK(MXPredFree(predictor));

  FILE* f = fopen(argv[5], "wb");
  if (f == NULL || fwrite(output, sizeof(float), out_count, f) != out_count) {
    fprintf(stderr, "predict: cannot write %s\n", argv[5]);
    return 1;
  }
  fclose(f);
  free(output);
  free(input);
  free(params);
  free(json);
  return 0;
}
