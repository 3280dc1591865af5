// ztier: the command-line front end (benchmarks, config tools, replay,
// checkpoints).
#include <cstdio>

#include <CLI/CLI.hpp>

#include "base/log.h"
#include "cli/commands.h"

namespace ztier::cli {

void InstallStderrLogSink(bool verbose) {
  SetLogSink(
      [](LogLevel level, std::string_view msg) {
        fprintf(stderr, "ztier: %.*s: %.*s\n",
                static_cast<int>(LogLevelName(level).size()),
                LogLevelName(level).data(), static_cast<int>(msg.size()),
                msg.data());
      },
      verbose ? LogLevel::kDebug : LogLevel::kInfo);
}

}  // namespace ztier::cli

int main(int argc, char** argv) {
  CLI::App app{"ztier: NVMe offload memory tiering engine"};
  app.require_subcommand(1);
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Print debug log messages");
  int exit_code = 0;

  CLI::App* bench = app.add_subcommand("bench", "Benchmarks: io, swap, step, sweep, adam, optimizer, checkpoint");
  bench->require_subcommand(1);
  ztier::cli::RegisterBenchIo(*bench, &exit_code);
  ztier::cli::RegisterBenchStep(*bench, &exit_code);
  ztier::cli::RegisterBenchSweep(*bench, &exit_code);
  ztier::cli::RegisterBenchSwap(*bench, &exit_code);
  ztier::cli::RegisterBenchAdam(*bench, &exit_code);
  ztier::cli::RegisterBenchOptimizer(*bench, &exit_code);
  ztier::cli::RegisterBenchCheckpoint(*bench, &exit_code);
  ztier::cli::RegisterConfigCommands(app, &exit_code);
  ztier::cli::RegisterTraceCommands(app, &exit_code);
  ztier::cli::RegisterReplay(app, &exit_code);
  ztier::cli::RegisterPlan(app, &exit_code);
  ztier::cli::RegisterCheckpointCommands(app, &exit_code);

  app.parse_complete_callback(
      [&verbose] { ztier::cli::InstallStderrLogSink(verbose); });
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 prints the message; its own codes (104 conversion, 105 range,
    // 109 unknown option, ...) become the CLI's one usage status, 2. --help
    // is a ParseError too, with code 0.
    return app.exit(e) == 0 ? 0 : 2;
  }
  return exit_code;
}
