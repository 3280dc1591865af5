/* Links against an installed libztier and checks that the header and the
 * library agree on the version. Exit 0 on success. */
#include <stdio.h>
#include <string.h>

#include <ztier/ztier.h>

int main(void) {
  uint32_t major = 99, minor = 99, patch = 99;
  if (ztier_version(&major, &minor, &patch) != ZTIER_STATUS_OK) return 1;
  if (major != ZTIER_VERSION_MAJOR || minor != ZTIER_VERSION_MINOR) return 2;
  if (ztier_engine_destroy(NULL) != ZTIER_STATUS_OK) return 3;
  if (ztier_module_fetch(NULL, 0, 1) != ZTIER_STATUS_INVALID_HANDLE) return 4;
  printf("consumer: ztier %s: %s\n", ztier_version_string(), ztier_last_error());
  return strcmp(ztier_version_string(), ZTIER_VERSION_STRING) == 0 ? 0 : 5;
}
