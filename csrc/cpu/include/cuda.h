// FASTCLU_CPU stand-in for the toolkit header: everything lives in the host shim.
#pragma once
#include "../cuda_shim.h"
