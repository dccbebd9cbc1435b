// The proxykern._C Python module: importing it loads the library, whose static
// initialisers register the proxykern::fused_sample op with the dispatcher.
#include <Python.h>

static PyModuleDef proxykern_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                         "proxykern's compiled kernels (ops live in torch.ops.proxykern)",
                                         -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&proxykern_c_module); }
