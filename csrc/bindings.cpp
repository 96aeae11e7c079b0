// pybind11 module fastclu._C: thin bindings over the host entry points of ops.h.
// Arguments are plain ints (device addresses, sizes, the CUDA stream handle) and floats, so the
// module links no torch library and imports on a machine without a GPU or driver: nothing
// here touches CUDA until an op is called. CUDA errors surface as RuntimeError naming the op.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// Scalars travel as (value, device address or 0); coefficient lists as Python lists of those.
fastclu::CombineConfig make_config(const py::dict& d) {
  fastclu::CombineConfig c;
  auto get = [&](const char* k) -> py::object {
    if (!d.contains(k)) throw py::key_error(std::string("combine_step config is missing ") + k);
    return d[k];
  };
  c.rule = get("rule").cast<int>();
  const int n_rules = static_cast<int>(fastclu::combine_rules().size());
  if (c.rule < 0 || c.rule >= n_rules) throw py::value_error("combine_step: unknown rule id");
  c.n_roles = get("n_roles").cast<int>();
  c.masked_bits = get("masked_bits").cast<unsigned>();
  c.update_mode = get("update_mode").cast<bool>();
  c.has_mask = get("has_mask").cast<bool>();
  c.has_restore = get("has_restore").cast<bool>();
  c.has_penalty = get("has_penalty").cast<bool>();
  c.maximize = get("maximize").cast<bool>();
  auto slots = get("hparams").cast<std::vector<double>>();
  auto flags = get("flags").cast<std::vector<int>>();
  if (slots.size() != static_cast<size_t>(fastclu::kRuleSlots))
    throw py::value_error("combine_step: hparams must have " + std::to_string(fastclu::kRuleSlots) + " slots");
  if (flags.size() != static_cast<size_t>(fastclu::kRuleFlags))
    throw py::value_error("combine_step: flags must have " + std::to_string(fastclu::kRuleFlags) + " entries");
  for (int i = 0; i < fastclu::kRuleSlots; ++i) c.hparams[i] = slots[i];
  for (int i = 0; i < fastclu::kRuleFlags; ++i) c.flags[i] = flags[i];
  auto scal = [&](const char* k, double& v, uint64_t& p) {
    auto t = get(k).cast<std::pair<double, uint64_t>>();
    v = t.first;
    p = t.second;
  };
  scal("lr", c.lr, c.lr_ptr);
  scal("scale", c.scale, c.scale_ptr);
  scal("penalty", c.penalty, c.penalty_ptr);
  scal("grad_scale", c.grad_scale, c.grad_scale_ptr);
  c.has_grad_scale = get("has_grad_scale").cast<bool>();
  auto coeffs = get("coeffs").cast<std::vector<std::pair<double, uint64_t>>>();
  // checked before the copy: coeff[] holds 4 entries (the kernel re-checks n_roles too)
  if (c.n_roles < 1 || c.n_roles > 4) throw py::value_error("combine_step: n_roles must be in [1, 4]");
  if (coeffs.size() != static_cast<size_t>(c.n_roles)) throw py::value_error("coeffs must have n_roles entries");
  for (size_t r = 0; r < coeffs.size(); ++r) {
    c.coeff[r] = coeffs[r].first;
    c.coeff_ptr[r] = coeffs[r].second;
  }
  c.found_inf_ptr = get("found_inf_ptr").cast<uint64_t>();
  c.clip_gram_ptr = get("clip_gram_ptr").cast<uint64_t>();
  c.has_clip = c.clip_gram_ptr != 0;
  c.clip_out_ptr = get("clip_out_ptr").cast<uint64_t>();
  scal("clip", c.clip, c.clip_ptr);
  c.step_mode = get("step_mode").cast<int>();
  c.step = get("step").cast<double>();
  c.steps_ptr = get("steps_ptr").cast<uint64_t>();
  return c;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastclu CUDA kernels (raw device addresses + CUDA stream handles; no torch ABI).";
  m.attr("CHUNK") = fastclu::chunk_elements();
  m.attr("ROW_HEADER") = fastclu::row_header();
  m.attr("ABI_VERSION") = 1;
  {
    py::dict rows;  // the combine table's operand rows, for the Python side to check against
    rows["param"] = static_cast<int>(fastclu::kParam);
    rows["restore"] = static_cast<int>(fastclu::kRestore);
    rows["grad0"] = static_cast<int>(fastclu::kGrad0);
    rows["mask"] = static_cast<int>(fastclu::kMask);
    rows["state0"] = static_cast<int>(fastclu::kState0);
    rows["state1"] = static_cast<int>(fastclu::kState1);
    rows["state_max"] = static_cast<int>(fastclu::kStateMax);
    rows["importance"] = static_cast<int>(fastclu::kImportance);
    rows["anchor"] = static_cast<int>(fastclu::kAnchor);
    rows["step"] = static_cast<int>(fastclu::kStep);
    m.attr("COMBINE_ROWS") = rows;
    m.attr("COMBINE_OPERANDS") = static_cast<int>(fastclu::kCombineOps);
    py::dict rules;  // the update rules' dispatch ids, checked against fastclu.ops.rules.RULES
    for (const auto& r : fastclu::combine_rules()) rules[py::str(r.first)] = r.second;
    m.attr("COMBINE_RULES") = rules;
    m.attr("RULE_SLOTS") = fastclu::kRuleSlots;
    m.attr("RULE_FLAGS") = fastclu::kRuleFlags;
  }
  {
    using namespace fastclu;
    py::dict tables, counts;  // every other table's operand rows (names as in fastclu/ops/tables.py)
    auto add = [&](const char* name, std::initializer_list<std::pair<const char*, int>> rows, int n_ops) {
      py::dict d;
      for (const auto& r : rows) d[r.first] = r.second;
      tables[name] = d;
      counts[name] = n_ops;
    };
    add("fisher_accumulate", {{"fisher", FisherRows::kFisher}, {"grad", FisherRows::kGrad}}, FisherRows::kOps);
    add("ratio_mask", {{"f_forget", RatioRows::kFForget}, {"f_remain", RatioRows::kFRemain}, {"out", RatioRows::kOut}},
        RatioRows::kOps);
    add("topk_mask", {{"scores", TopkRows::kScores}, {"out", TopkRows::kOut}}, TopkRows::kOps);
    add("lerp_sync", {{"slow", LerpRows::kSlow}, {"fast", LerpRows::kFast}}, LerpRows::kOps);
    add("fd_hvp", {{"out", HvpRows::kOut}, {"grad_plus", HvpRows::kGradPlus}, {"grad_minus", HvpRows::kGradMinus}},
        HvpRows::kOps);
    add("merge", {{"param", MergeRows::kParam}, {"anchor", MergeRows::kAnchor}}, MergeRows::kOps);
    add("merge_stats",
        {{"param", MergeStatsRows::kParam}, {"anchor", MergeStatsRows::kAnchor},
         {"fisher_sum", MergeStatsRows::kFisherSum}, {"fisher_theta_sum", MergeStatsRows::kFisherThetaSum}},
        MergeStatsRows::kOps);
    add("perturb", {{"param", PerturbRows::kParam}, {"backup", PerturbRows::kBackup}, {"source", PerturbRows::kSource}},
        PerturbRows::kOps);
    add("row_norms", {{"param", RowNormRows::kParam}, {"norms", RowNormRows::kNorms}}, RowNormRows::kOps);
    add("gram", {{"grad0", GramRows::kGrad0}, {"mask", GramRows::kMask}}, GramRows::kOps);
    add("restore", {{"param", RestoreRows::kParam}, {"backup", RestoreRows::kBackup}}, RestoreRows::kOps);
    add("soup_combine",
        {{"out", SoupCombineRows::kOut}, {"base", SoupCombineRows::kBase}, {"diff0", SoupCombineRows::kDiff0}},
        SoupCombineRows::kOps);
    add("soup_coef_grads", {{"grads", SoupGradRows::kGrads}, {"diff0", SoupGradRows::kDiff0}}, SoupGradRows::kOps);
    m.attr("TABLE_ROWS") = tables;
    m.attr("TABLE_OPERANDS") = counts;
  }

  m.def("fisher_accumulate", &fastclu::fisher_accumulate, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "scale"_a,
        "scale_ptr"_a, "power"_a, "stream"_a);
  m.def("ratio_mask", &fastclu::ratio_mask, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "gamma"_a, "gamma_ptr"_a, "eps"_a,
        "stream"_a);
  m.def("lerp_sync", &fastclu::lerp_sync, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "beta"_a, "beta_ptr"_a, "stream"_a);
  m.def("fd_hvp", &fastclu::fd_hvp, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "eps"_a, "eps_ptr"_a, "accumulate"_a,
        "stream"_a);
  m.def("merge", &fastclu::merge, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "alpha"_a, "alpha_ptr"_a, "stream"_a);
  m.def("perturb_dir", &fastclu::perturb_dir, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "scale"_a, "scale_ptr"_a,
        "mode"_a, "stream"_a);
  m.def("row_norms", &fastclu::row_norms, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "stream"_a);
  m.def("perturb_noise", &fastclu::perturb_noise, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "scale"_a, "scale_ptr"_a,
        "seed"_a, "stream"_a);
  m.def("gram", &fastclu::gram, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "n_roles"_a, "masked_bits"_a, "partial"_a,
        "out"_a, "stream"_a);
  m.def("merge_stats", &fastclu::merge_stats, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "partial"_a, "out"_a,
        "stream"_a);
  m.def("soup_combine", &fastclu::soup_combine, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "K"_a, "coefs"_a,
        "n_cols"_a, "stream"_a);
  m.def("soup_coef_grads", &fastclu::soup_coef_grads, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "K"_a,
        "n_tensors"_a, "partial"_a, "out"_a, "stream"_a);
  m.def("topk_mask", &fastclu::topk_mask, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "k"_a, "state"_a, "eqcount"_a,
        "stream"_a);
  m.def("philox_words", &fastclu::philox_words_host, "seed"_a, "tensor_index"_a, "j"_a,
        "The four Philox 4x32-10 words of element j (host evaluation of the kernels' code).");
  m.def("philox_normal", &fastclu::philox_normal_host, "seed"_a, "tensor_index"_a, "j"_a,
        "The kernels' standard normal for element j, evaluated on the host (libm may differ by an ulp).");
  m.def("restore_mt", &fastclu::restore_mt, "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "stream"_a);
  m.def(
      "combine_step",
      [](uint64_t table, uint64_t dyn, int n_rows, int64_t n_chunks, const py::dict& config, uint64_t stream) {
        const fastclu::CombineConfig cfg = make_config(config);
        fastclu::combine_step(table, dyn, n_rows, n_chunks, cfg, stream);
      },
      "table"_a, "dyn"_a, "n_rows"_a, "n_chunks"_a, "config"_a, "stream"_a);
}
