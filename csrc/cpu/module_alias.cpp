// The CPU build links the unchanged bindings.cpp, whose module is named _C; this entry point
// lets the same code import as fastclu._C_cpu (pybind11 3 takes the module name from the spec).
#include <Python.h>

extern "C" PyObject* PyInit__C();
extern "C" __attribute__((visibility("default"))) PyObject* PyInit__C_cpu() { return PyInit__C(); }
