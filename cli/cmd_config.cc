// `ztier config check FILE` and `ztier config import ds_config.json`.
#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "cli/commands.h"
#include "cli/data_files.h"
#include "cli/output.h"
#include "tiering/config.h"
#include "tiering/ds_import.h"

namespace ztier::cli {
namespace {

void PrintErrorLines(std::string_view message) {
  // One error per line, as the loader wrote them.
  size_t start = 0;
  while (start <= message.size()) {
    size_t end = message.find('\n', start);
    if (end == std::string_view::npos) end = message.size();
    std::string_view line = message.substr(start, end - start);
    if (!line.empty())
      fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
    start = end + 1;
  }
}

struct CheckArgs {
  std::string file = "default";  // the shipped configs/default.yaml
  bool no_path_check = false;
};

int RunCheck(const CheckArgs& a) {
  Result<std::string> file = ResolveConfigPath(a.file);
  if (!file.ok()) {
    fprintf(stderr, "ztier: %s\n", std::string(file.status().message()).c_str());
    return kExitUsage;
  }
  tiering::LoadOptions options;
  options.check_paths = !a.no_path_check;
  Result<tiering::Config> config = tiering::LoadConfigFile(*file, options);
  if (!config.ok()) {
    const Status& s = config.status();
    if (s.code() == StatusCode::kInvalidArgument) {
      PrintErrorLines(s.message());
      size_t lines = 1;
      for (char c : s.message()) lines += c == '\n';
      fprintf(stderr, "ztier: %s: %zu error%s\n", file->c_str(), lines,
              lines == 1 ? "" : "s");
      if (s.message().find("NVMe path") != std::string_view::npos) {
        fprintf(stderr,
                "ztier: a config meant for another machine can be checked with "
                "--no-path-check\n");
      }
    } else {
      fprintf(stderr, "ztier: %s\n", std::string(s.message()).c_str());
    }
    return kExitUsage;
  }
  printf("%s: ok%s\n\n%s", file->c_str(),
         a.no_path_check ? " (NVMe paths not checked)" : "",
         tiering::SummarizeConfig(*config).c_str());
  return 0;
}

struct ImportArgs {
  std::string file;
  bool strict = false;
};

// The DeepSpeed JSON named by `file` ('-': stdin) into *text; false (after
// printing why) when it cannot be read.
bool ReadImportInput(const std::string& file, std::string* text) {
  std::ostringstream ss;
  if (file == "-") {
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), stdin)) > 0)
      ss.write(buf, static_cast<std::streamsize>(n));
  } else {
    std::ifstream in(file, std::ios::binary);
    if (!in) {
      Status s = Status::FromErrno(errno, "cannot open '" + file + "'");
      fprintf(stderr, "ztier: %s\n", std::string(s.message()).c_str());
      return false;
    }
    ss << in.rdbuf();
  }
  *text = ss.str();
  return true;
}

void PrintImportError(const std::string& file, std::string_view message) {
  // One problem per line, each naming its key path.
  if (message.find('\n') == std::string_view::npos) {
    fprintf(stderr, "ztier: %s: %s\n", file.c_str(),
            std::string(message).c_str());
    return;
  }
  fprintf(stderr, "ztier: %s:\n", file.c_str());
  PrintErrorLines(message);
}

// The YAML with the notes and unmapped keys as comments on stdout; the notes
// and a summary on stderr.
void PrintImport(const std::string& file, const tiering::ImportResult& r) {
  printf("# ztier config imported from the DeepSpeed config %s\n",
         file.c_str());
  printf("# (`ztier config import`; docs/config.md describes every key).\n");
  for (const std::string& note : r.notes) printf("# note: %s\n", note.c_str());
  fputs(tiering::ConfigToYaml(r.config).c_str(), stdout);
  for (const std::string& key : r.unmapped_keys)
    printf("# not mapped: %s\n", key.c_str());

  for (const std::string& note : r.notes)
    fprintf(stderr, "ztier: note: %s\n", note.c_str());
  if (!r.unmapped_keys.empty()) {
    std::string list;
    for (const std::string& k : r.unmapped_keys)
      list += (list.empty() ? "" : ", ") + k;
    fprintf(stderr,
            "ztier: %zu DeepSpeed key%s not mapped (listed at the end of the "
            "output): %s\n",
            r.unmapped_keys.size(), r.unmapped_keys.size() == 1 ? "" : "s",
            list.c_str());
  }
  if (!r.issues.empty()) {
    fprintf(stderr,
            "ztier: %zu DeepSpeed key%s not reproduced as DeepSpeed reads "
            "them (see the notes); --strict makes this an error\n",
            r.issues.size(), r.issues.size() == 1 ? "" : "s");
  }
}

int RunImport(const ImportArgs& a) {
  std::string text;
  if (!ReadImportInput(a.file, &text)) return kExitUsage;
  tiering::ImportOptions options;
  options.strict = a.strict;
  Result<tiering::ImportResult> r = tiering::ImportDeepSpeedJson(text, options);
  if (!r.ok()) {
    PrintImportError(a.file, r.status().message());
    return kExitUsage;
  }
  PrintImport(a.file, *r);
  return 0;
}

}  // namespace

void RegisterConfigCommands(CLI::App& app, int* exit_code) {
  CLI::App* config = app.add_subcommand(
      "config", "Check a ztier YAML config, or import a DeepSpeed one");
  config->require_subcommand(1);

  auto check_args = std::make_shared<CheckArgs>();
  CLI::App* check =
      config->add_subcommand("check",
                             "Validate a YAML config: print the effective "
                             "config (exit 0) or every error "
                             "with its line and column (exit 2)");
  check->add_option("FILE", check_args->file,
                    "ztier YAML config: a file, or a name in configs/ (examples/one_nvme)")
      ->capture_default_str();
  check->add_flag("--no-path-check", check_args->no_path_check,
                  "Do not look at the NVMe paths on this machine (a config for "
                  "another one)");
  check->callback(
      [check_args, exit_code] { *exit_code = RunCheck(*check_args); });

  auto import_args = std::make_shared<ImportArgs>();
  CLI::App* import =
      config->add_subcommand("import",
                             "Convert a DeepSpeed JSON config's offload "
                             "settings to ztier YAML (stdout); "
                             "keys without a ztier equivalent are listed");
  import
      ->add_option("FILE", import_args->file,
                   "DeepSpeed JSON config ('-': stdin)")
      ->required();
  import->add_flag("--strict", import_args->strict,
                   "Fail (exit 2) on every DeepSpeed key the ztier config "
                   "does not reproduce, instead of noting it");
  import->callback([import_args, exit_code] { *exit_code = RunImport(*import_args);
});
}  // namespace ztier::cli

}  // namespace ztier::cli
