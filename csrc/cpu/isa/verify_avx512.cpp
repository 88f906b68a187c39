#include "instantiate_verify.h"
