// `ztier checkpoint info|verify|export DIR`: what a checkpoint holds, whether
// every byte of it is intact, and its weights as a file torch.load reads.
#include <fmt/format.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/checkpoint.h"
#include "cli/bench_util.h"
#include "cli/commands.h"
#include "cli/output.h"

namespace ztier::cli {
namespace {

namespace ck = ztier::checkpoint;


int Fail(const char* cmd, const Status& s) {
  fprintf(stderr, "ztier checkpoint %s: error: %s\n", cmd, s.ToString().c_str());
  return ExitCodeFor(s);  // 1 damaged or failed, 2 no such checkpoint
}

int RunInfo(const std::string& dir, bool json) {
  Result<ck::Manifest> m = ck::ReadManifest(dir);
  if (!m.ok()) return Fail("info", m.status());
  uint64_t elements = 0, with_state = 0, with_grad = 0;
  for (const auto& p : m->params) {
    elements += p.numel;
    with_state += p.has_state ? 1 : 0;
    with_grad += p.has_grad ? 1 : 0;
  }
  if (json) {
    nlohmann::json j = {{"dir", dir},
                        {"format", ck::kManifestFormat},
                        {"step", m->step},
                        {"world_size", m->world_size},
                        {"created", m->created},
                        {"library_version", m->library_version},
                        {"params", m->params.size()},
                        {"elements", elements},
                        {"params_with_optimizer_state", with_state},
                        {"params_with_pending_gradient", with_grad},
                        {"optimizer_groups", m->groups.size()},
                        {"user_bytes", m->user.bytes}};
    printf("%s\n", WithRunInfo(std::move(j)).dump().c_str());
    return 0;
  }
  printf("checkpoint %s (%s)\n", dir.c_str(), ck::kManifestFormat);
  printf("  saved %s by %s, world size %u, optimizer step %llu\n", m->created.c_str(),
         m->library_version.empty() ? "?" : m->library_version.c_str(), m->world_size,
         static_cast<unsigned long long>(m->step));
  printf("  %zu parameters, %llu elements; optimizer state for %llu (%zu groups); pending "
         "gradients for %llu\n",
         m->params.size(), static_cast<unsigned long long>(elements),
         static_cast<unsigned long long>(with_state), m->groups.size(),
         static_cast<unsigned long long>(with_grad));
  for (size_t g = 0; g < m->groups.size(); ++g) {
    const auto& h = m->groups[g];
    printf("  group %zu: %s lr %g betas (%g, %g) eps %g weight_decay %g\n", g,
           h.adamw ? "AdamW" : "Adam", h.lr, h.beta1, h.beta2, h.eps, h.weight_decay);
  }
  printf("  user data %s; not verified here (ztier checkpoint verify reads every chunk)\n",
         FormatSize(m->user.bytes).c_str());
  return 0;
}

int RunVerify(const std::string& dir) {
  std::string summary;
  Status s = ck::Verify(dir, &summary);
  if (!s.ok()) return Fail("verify", s);
  printf("%s\n", summary.c_str());
  return 0;
}

int RunExport(const std::string& dir, const std::string& out) {
  Status s = ck::ExportTorch(dir, out);
  if (!s.ok()) return Fail("export", s);
  printf("wrote %s (torch.load reads it: a dict of name -> float32 tensor)\n", out.c_str());
  return 0;
}

}  // namespace

void RegisterCheckpointCommands(CLI::App& app, int* exit_code) {
  CLI::App* cmd = app.add_subcommand("checkpoint", "Inspect, verify and export checkpoints");
  cmd->require_subcommand(1);
  auto dir = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  auto out = std::make_shared<std::string>();

  CLI::App* info = cmd->add_subcommand("info", "What a checkpoint holds (its manifest)");
  info->add_option("dir", *dir, "Checkpoint directory")->required();
  info->add_flag("--json", *json, "Print one JSON object");
  info->callback([=] { *exit_code = RunInfo(*dir, *json); });

  CLI::App* verify = cmd->add_subcommand(
      "verify", "Read every file and chunk of a checkpoint; exit 0 if intact, 1 if damaged");
  verify->add_option("dir", *dir, "Checkpoint directory")->required();
  verify->callback([=] { *exit_code = RunVerify(*dir); });

  CLI::App* exp = cmd->add_subcommand(
      "export", "Write the full-precision weights as a file torch.load reads");
  exp->add_option("dir", *dir, "Checkpoint directory")->required();
  exp->add_option("-o,--output", *out, "Output file (e.g. model.pt)")->required();
  exp->callback([=] { *exit_code = RunExport(*dir, *out); });
}

}  // namespace ztier::cli
