#pragma once
// libtorch (with everything the adapter includes) before doctest: Debian's libtorch is built with
// glog, and some of its headers pull in glog's CHECK, CHECK_EQ, ... macros, which abort the
// process on failure. Included after doctest they silently replace doctest's assertions (the
// system-header redefinition is not warned about), so they are removed here first.
#include <torch/torch.h>
#include <velora/torch/torch.hpp>

#undef CHECK
#undef CHECK_EQ
#undef CHECK_NE
#undef CHECK_LT
#undef CHECK_LE
#undef CHECK_GT
#undef CHECK_GE

#include <doctest/doctest.h>
